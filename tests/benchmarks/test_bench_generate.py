"""The end-to-end generate benchmark runs as a harness on CPU (tiny model) and writes the agreed keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from maskpro.bench import cli

ROOT = Path(__file__).resolve().parents[2]


def test_generate_harness_writes_dense_and_sparse(tmp_path):
    out = tmp_path / "generate.json"
    subprocess.run([sys.executable, "-m", "benchmarks.generate", "--prompt", "16", "--new", "4", "--reps", "2",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["batch"] == 1
    for key in ("decode_tokens_per_s", "ttft_ms"):
        assert set(r[key]) == {"dense", "sparse"} and all(v > 0 for v in r[key].values())
    assert r["runtime"]["backend"] == "dense"  # CPU: no kernels swapped, same API
    assert r["env"]["command"].startswith("python -m benchmarks.generate --prompt 16")


def test_generate_sweeps_batch_sizes_and_prompts(tmp_path):
    out = tmp_path / "generate-sweep.json"
    assert cli.main(["generate", "--batch-sizes", "1", "3", "--prompts", "8", "24", "--new", "3", "--reps", "2",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(row["batch"], row["prompt_tokens"]) for row in r["rows"]] == [(1, 8), (1, 24), (3, 8), (3, 24)]
    first = r["rows"][0]
    assert r["ttft_ms"] == {"dense": first["dense"]["ttft_ms"], "sparse": first["sparse"]["ttft_ms"]}
    assert r["decode_tokens_per_s"]["dense"] == first["dense"]["decode_tokens_per_s"]
    assert r["order"] == "interleaved" and r["variants"] == ["dense", "2:4"]  # no fused dense on CPU
    assert r["prefill_graphs"] is False
    for row in r["rows"]:
        assert row["point_memory"]["peak_rss_mib"] > 0
        for path in ("dense", "sparse"):  # both measured in this process
            m = row[path]
            assert m["ttft_ms"] > 0 and m["ms_per_token"] > 0
            assert m["decode_tokens_per_s"] == row["batch"] * 1000 / m["ms_per_token"]
            assert m["prefill_graph"] is False and m["decode_graph"] is False  # graphs are for CUDA only
            assert 0 <= m["prefill_logits_rel_err"] < 1e-5  # CPU: the 2:4 model runs its dense masked weights
        assert row["decode_speedup"] == row["sparse"]["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"]
        assert isinstance(row["trusted"], bool)
    assert r["env"]["command"].startswith("maskpro-bench generate")
    assert out.with_suffix(".png").is_file()


def test_generate_loads_a_model_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "generate-folder.json"
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--prompts", "8", "--new", "2", "--reps", "2",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert str(tiny_model_dir) in r["model"] and r["rows"][0]["dense"]["ttft_ms"] > 0
