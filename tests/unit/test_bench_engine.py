"""The engine benchmark runs end to end at toy scale and writes the documented JSON."""

from __future__ import annotations

import json

from adrenaline.bench.engine_bench import main


def test_engine_bench_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    main(["--model", "tiny", "--dtype", "float32", "--num-requests", "4", "--input-len", "16",
          "--output-len", "8", "--systems", "adrenaline,transformers", "--out", str(out)])
    result = json.loads(out.read_text())
    systems = [r["system"] for r in result["rows"]]
    assert systems[0] == "adrenaline" and systems[1].startswith("transformers")
    for row in result["rows"]:
        assert row["output_tok_s"] > 0 and row["num_output_tokens"] == 32
    # float32 greedy: transformers generates exactly our tokens.
    assert result["rows"][1]["greedy_prefix_agreement_vs_adrenaline"] == 1.0
