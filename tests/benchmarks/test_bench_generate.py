"""The end-to-end generate benchmark runs as a harness on CPU (tiny model) and writes the agreed keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert r["env"]["command"].startswith("generate.py")
