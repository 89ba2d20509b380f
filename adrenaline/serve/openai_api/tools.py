"""Tool calling in chat: how tools reach the prompt, the schema that forces a call, and how
calls are read back from the output. Nothing here touches Ray or FastAPI.

A model that writes calls on its own ("auto") writes ``<tool_call>{"name": ..., "arguments":
...}</tool_call>`` blocks (the Hermes convention; a chat template without tools gets a system
message asking for it). "required" and a named function are forced by a JSON schema: an
array of ``{"name", "parameters"}`` objects, or the function's parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from adrenaline.serve.openai_api.errors import bad_request

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolMode:
    """Chat tool calling. ``choice``: "auto" (calls parsed from ``<tool_call>`` blocks when
    the model writes them), "required" (the output is forced to a JSON array of
    ``{"name", "parameters"}`` calls) or "named" (forced to ``name``'s arguments)."""

    choice: str
    names: list[str]
    name: str | None = None


def tool_call_text(calls) -> str:
    """Calls an assistant made, written as the model is asked to write them."""
    out = []
    for c in calls:
        try:
            args = json.loads(c.function.arguments)
        except ValueError:
            args = c.function.arguments
        out.append(f"{TOOL_CALL_OPEN}{json.dumps({'name': c.function.name, 'arguments': args})}"
                   f"{TOOL_CALL_CLOSE}")
    return "\n".join(out)


def tools_system_text(tools: list[dict]) -> str:
    """Tools described for a chat template that does not render them itself."""
    return ("You may call these functions:\n" + "\n".join(json.dumps(t["function"])
                                                          for t in tools)
            + f"\nTo call one, answer {TOOL_CALL_OPEN}{{\"name\": <function name>, "
              f"\"arguments\": <arguments object>}}{TOOL_CALL_CLOSE}.")


def tool_mode(tools: list, choice, parallel_tool_calls: bool | None
              ) -> tuple[ToolMode | None, str | None]:
    """(how to read tool calls from the output, the JSON schema forcing them) of a chat
    request's ``tools`` and ``tool_choice`` (a string, or an object naming a function)."""
    for i, t in enumerate(tools):
        if t.type != "function":
            raise bad_request(f"`tools[{i}].type` must be function, got {t.type!r}",
                              param=f"tools[{i}].type")
    names = [t.function.name for t in tools]
    if choice is None:
        choice = "auto" if tools else "none"
    if not isinstance(choice, str):  # {"type": "function", "function": {"name": ...}}
        if choice.function.name not in names:
            raise bad_request(f"`tool_choice`: no tool named {choice.function.name!r} in `tools`",
                              param="tool_choice")
        fn = tools[names.index(choice.function.name)].function
        return (ToolMode("named", names, fn.name),
                json.dumps(fn.parameters or {"type": "object"}, sort_keys=True))
    if choice not in ("none", "auto", "required"):
        raise bad_request(f"`tool_choice` must be none, auto, required or a named function, "
                          f"got {choice!r}", param="tool_choice")
    if choice == "none":
        return None, None
    if not tools:
        raise bad_request(f"`tool_choice` {choice} needs `tools`", param="tool_choice")
    if choice == "auto":
        return ToolMode("auto", names), None
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"type": "string", "enum": [t.function.name]},
                             "parameters": t.function.parameters or {"type": "object"}}}
             for t in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return ToolMode("required", names), json.dumps(schema, sort_keys=True)


def parse_tool_calls(mode: ToolMode, text: str) -> list[dict] | None:
    """Tool calls in a choice's raw output ({"name", "arguments"} dicts, arguments as JSON
    text), or None when it holds none (or they do not parse)."""
    try:
        if mode.choice == "named":
            json.loads(text)
            return [{"name": mode.name, "arguments": text}]
        if mode.choice == "required":
            return [{"name": c["name"], "arguments": json.dumps(c["parameters"])}
                    for c in json.loads(text)]
        calls = []
        for block in text.split(TOOL_CALL_OPEN)[1:]:
            obj = json.loads(block.split(TOOL_CALL_CLOSE)[0])
            for c in obj if isinstance(obj, list) else [obj]:
                args = c.get("arguments", c.get("parameters", {}))
                calls.append({"name": c["name"], "arguments": args if isinstance(args, str)
                              else json.dumps(args)})
        return [c for c in calls if c["name"] in mode.names] or None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None




def parse_complete_tool_calls(mode: ToolMode, text: str) -> list[dict]:
    """The complete tool calls at the start of output cut short (by max_tokens); a call
    still being written is dropped. "required": the array's complete elements; "auto":
    the closed ``<tool_call>`` blocks; "named": the arguments only if they are whole."""
    if mode.choice == "named":
        return parse_tool_calls(mode, text) or []
    if mode.choice == "auto":
        closed = text[:text.rfind(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE)] \
            if TOOL_CALL_CLOSE in text else ""
        return parse_tool_calls(mode, closed) or []
    decoder, calls = json.JSONDecoder(), []
    at = text.find("[")
    if at < 0:
        return []
    at += 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:  # the element being written when the output was cut
            return calls
        if not (isinstance(obj, dict) and obj.get("name") in mode.names
                and isinstance(obj.get("parameters"), dict)):
            return calls
        calls.append({"name": obj["name"], "arguments": json.dumps(obj["parameters"])})
