"""Time and memory of each export of SmolLM2 2:4 on this machine, every export in a fresh process.

  python -m benchmarks.export_cost [--src PRUNED_FOLDER] [--engines onnx vllm sparse24]

Peak memory is the child's maximum resident set size (getrusage); the baseline is a child that only
imports the same libraries, so "above baseline" is what the export itself holds. The ratio to the source
weights' bytes is the figure the export's memory target bounds (under 2x). Writes ``results/export-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .env import RESULTS, environment, merge_json

_IMPORTS = ("import torch, transformers, onnx, onnxruntime, safetensors; "
            "import maskpro.export.onnx, maskpro.export.vllm, maskpro.export.sparse24, maskpro.export.cli")


def run_child(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read())
    return wall, usage.ru_maxrss * 1024, proc.returncode


def make_source(folder: Path) -> Path:
    """A magnitude-pruned SmolLM2 (export cost does not depend on how the mask was found)."""
    subprocess.run([sys.executable, "-m", "maskpro.cli", "prune", "--method", "magnitude", "--out", str(folder),
                    "-q"], check=True)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=None, help="a maskpro folder (default: SmolLM2 pruned by magnitude)")
    p.add_argument("--engines", nargs="+", default=["onnx", "vllm", "sparse24"])
    p.add_argument("--tag", default="smollm2-cpu")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="maskpro-export-cost-"))
    src = Path(a.src) if a.src else make_source(work / "src")
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors") if f.name != "masks.safetensors")
    _, base_rss, _ = run_child([sys.executable, "-c", _IMPORTS])
    rows = {}
    for engine in a.engines:
        wall, peak, rc = run_child([sys.executable, "-m", "maskpro.export.cli", str(src), "--engine", engine,
                                    "--out", str(work / engine), "--quiet"])
        rows[engine] = {"exit_code": rc, "wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20, 1),
                        "baseline_rss_mib": round(base_rss / 2**20, 1),
                        "above_baseline_over_weights": round((peak - base_rss) / weights, 3)}
        report = work / engine / "export-report.json"
        if engine == "onnx" and report.is_file():
            onnx_report = json.loads(report.read_text())
            rows[engine]["parity"] = {k: v for k, v in onnx_report.get("parity", {}).items()
                                      if not k.startswith("greedy_tokens")}
            rows[engine]["onnx_check"] = {k: v for k, v in onnx_report["onnx_check"].items() if k != "dense_layers"}
        print(engine, rows[engine], flush=True)
    merge_json(RESULTS / f"export-{a.tag}.json",
               {"source": str(a.src or "SmolLM2-135M-Instruct, magnitude 2:4, fp32 safetensors"),
                "source_weight_mib": round(weights / 2**20, 1), "cpu_count": os.cpu_count(),
                "engines": rows, "env": environment(), "device": "cpu"})


if __name__ == "__main__":
    main()
