"""lm-eval against the served SmolLM2 equals lm-eval's own transformers (``hf``) backend.

Runs the project's multiple-choice task (evals/tasks/adrenaline_mc: 60 questions, 4
choices each) twice with EleutherAI's lm-evaluation-harness:

* ``local-completions``: lm-eval's OpenAI-completions client against the app that
  ``make run`` serves (serve_configs/local.yaml's args, started here on a free port, or
  ``--base-url`` of one already running). It scores each choice with ``echo``,
  ``logprobs`` and ``max_tokens`` 1, several prompts per request (``--batch-size``).
* ``hf``: transformers loading the same GGUF checkpoint itself, float32, batch 1.

Both tokenize with the same tokenizer (transformers' reading of the GGUF, saved once),
so both score the same token ids. Passes (exit 0) when accuracy and every question's
chosen answer are equal, a question whose best two choices are within ``--tie`` of
each other on either side counting as equal whichever it picks; prints the largest
log-likelihood difference. Needs lm-eval: ``make eval`` installs it (the ``eval`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "evals" / "tasks"
TASK = "adrenaline_mc"
CONFIG = ROOT / "serve_configs" / "local.yaml"


def _serve_local(args_override: dict) -> str:
    """Start serve_configs/local.yaml's app (in this process's Ray) on a free port."""
    import socket

    import ray
    import yaml
    from ray import serve

    from adrenaline.serve.app import build_app

    app_args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    app_args.update(args_override)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="adrenaline-eval", route_prefix="/")
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while httpx.get(f"{url}/health", timeout=30).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the app never became healthy")
        time.sleep(1)
    return url


def _run(model: str, model_args: dict, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                          task_manager=TaskManager(include_path=str(TASKS)),
                          batch_size=batch_size, log_samples=True)
    return res


def _per_question(res: dict) -> dict[int, list[float]]:
    """doc id -> the log-likelihood of each choice."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]]
            for s in res["samples"][TASK]}


def compare(served: dict, ref: dict, tie: float) -> dict:
    a, b = _per_question(served), _per_question(ref)
    assert a.keys() == b.keys(), "the two runs scored different questions"
    mismatches, ties, max_diff = [], 0, 0.0
    for doc in sorted(a):
        la, lb = a[doc], b[doc]
        max_diff = max(max_diff, max(abs(x - y) for x, y in zip(la, lb)))
        pa, pb = max(range(len(la)), key=la.__getitem__), max(range(len(lb)), key=lb.__getitem__)
        if pa == pb:
            continue
        tied = any(sorted(l)[-1] - sorted(l)[-2] <= tie for l in (la, lb))
        ties += tied
        if not tied:
            mismatches.append((doc, pa, pb, la, lb))
    acc_a = served["results"][TASK]["acc,none"]
    acc_b = ref["results"][TASK]["acc,none"]
    return {"questions": len(a), "acc_served": acc_a, "acc_hf": acc_b,
            "choices_differ_in_ties": ties, "mismatches": mismatches,
            "max_loglikelihood_diff": max_diff,
            "ok": not mismatches and (acc_a == acc_b or ties > 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", help="a running server (default: start local.yaml's app)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per API request")
    ap.add_argument("--tie", type=float, default=1e-4,
                    help="log-likelihood gap below which two choices count as tied")
    ap.add_argument("--out", type=Path, help="write the comparison as JSON here")
    opts = ap.parse_args()

    import transformers

    from adrenaline.model.packaged import packaged_gguf

    start = time.perf_counter()
    gguf = packaged_gguf("smollm2-135m-instruct")
    tok_dir = Path(tempfile.mkdtemp(prefix="adrenaline-eval-tok-"))
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name
                                               ).save_pretrained(tok_dir)
    url = opts.base_url or _serve_local({})
    served = _run("local-completions", {
        "model": "smollm2-135m-instruct", "base_url": f"{url}/v1/completions",
        "tokenizer": str(tok_dir), "tokenized_requests": True, "num_concurrent": 1,
        "max_retries": 1}, opts.batch_size)
    t_served = time.perf_counter() - start
    if not opts.base_url:  # free the cores for the reference run
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    ref = _run("hf", {"pretrained": str(gguf.parent), "gguf_file": gguf.name,
                      "tokenizer": str(tok_dir), "dtype": "float32", "device": "cpu"}, 1)
    report = compare(served, ref, opts.tie)
    report["runtime_s"] = round(time.perf_counter() - start, 1)
    report["served_runtime_s"] = round(t_served, 1)
    print(json.dumps({k: v for k, v in report.items() if k != "mismatches"}, indent=2))
    for doc, pa, pb, la, lb in report["mismatches"]:
        print(f"question {doc}: served picks {pa} {la}, hf picks {pb} {lb}")
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=2))
    print("PASS" if report["ok"] else "FAIL")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
