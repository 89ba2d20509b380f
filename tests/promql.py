"""A small PromQL reader for the dashboard test: tokens, bracket structure, metric names.

Covers what Grafana panels use: functions, aggregations with ``by``/``without``,
label matchers, range selectors, binary operators and numbers. A metric name is an
identifier that is not a function call, a keyword, a label name inside ``{...}`` or
a label in a grouping list. Anything it cannot tokenize is an error (ValueError).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<duration>\[[^\]]*\])
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,])
  | (?P<open>[({])
  | (?P<close>[)}])
""", re.VERBOSE)

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset"}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values", "group"}
_PAIRS = {")": "(", "}": "{"}


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(expr):
        m = _TOKEN.match(expr, at)
        if m is None:
            raise ValueError(f"cannot read PromQL at {at}: {expr[at:at + 20]!r}")
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
        at = m.end()
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (ValueError if it does not parse)."""
    tokens = tokenize(expr)
    names: set[str] = set()
    stack: list[str] = []
    grouping = False  # inside the (...) after by/without/on/ignoring
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        prev = tokens[i - 1][1] if i else ""
        if kind == "open":
            grouping = text == "(" and prev in ("by", "without", "on", "ignoring")
            stack.append(text)
        elif kind == "close":
            if not stack or stack.pop() != _PAIRS[text]:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
            grouping = False
        elif kind == "duration" and not re.fullmatch(r"\[(\$\w+|\d+[smhdwy])\]", text):
            raise ValueError(f"bad range {text!r} in {expr!r}")
        elif kind == "ident":
            if text in AGGREGATIONS and nxt in ("(", "by", "without"):
                continue
            if text in KEYWORDS or nxt == "(" or grouping or (stack and stack[-1] == "{"):
                continue
            names.add(text)
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")
    return names
