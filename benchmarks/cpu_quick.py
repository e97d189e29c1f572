"""The CPU recipe measured: ``maskpro prune --preset cpu-quick`` against dense and SparseGPT alone.

  maskpro-bench cpu-quick                     # minutes on a 2-core CPU (docs/robustness.md)

Runs, on this machine's CPU and through the same command line a user types: the dense model, SparseGPT with
the preset's calibration (16 windows of 512 C4 tokens), and the preset itself (SparseGPT, one block re-fit
epoch, 20 MaskPro steps); each is scored with ``maskpro eval --quick`` (WikiText-2 and C4, 16 windows of 512
tokens). Wall times include loading and saving. Writes ``cpu-quick.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from maskpro.cli import PRESETS
from maskpro.cli import main as maskpro
from maskpro.schema import METADATA, read_meta

from .env import add_output_args, environment, output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: ../shared/data)")
    add_output_args(p, "cpu-quick.json")


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    code = maskpro(argv)
    if code != 0:
        raise SystemExit(f"maskpro {' '.join(argv)} exited {code}")
    return round(time.perf_counter() - t0, 1)


def run(a: argparse.Namespace) -> Path:
    common = [*(["--model", a.model] if a.model else []), *(["--data-dir", a.data_dir] if a.data_dir else [])]
    data = ["--data-dir", a.data_dir] if a.data_dir else []
    preset = PRESETS["cpu-quick"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskpro-cpu-quick-") as tmp:
        runs = {
            "dense": None,
            "sparsegpt (same calibration)": ["--method", "sparsegpt", "--calib-samples", str(preset["calib_samples"]),
                                             "--calib-seq-len", str(preset["calib_seq_len"]), "--device", "cpu"],
            "cpu-quick preset": ["--preset", "cpu-quick"],
        }
        for name, prune_args in runs.items():
            row: dict = {"method": name}
            model = common
            if prune_args is not None:
                out = Path(tmp) / name.split()[0]
                row["prune_argv"] = ["maskpro", "prune", *prune_args, "--out", "OUT"]
                row["prune_s"] = _timed(["prune", *common, *prune_args, "--out", str(out), "-q"])
                model = ["--model", str(out), *data]
                row[METADATA] = {k: v for k, v in read_meta(out).to_dict().items()
                                 if k in ("method", "calibration", "learner", "refit_before_learning")}
            scores = Path(tmp) / f"{name.split()[0]}-eval.json"
            row["eval_s"] = _timed(["eval", *model, "--quick", "--device", "cpu", "-q", "--json", str(scores)])
            row["perplexity"] = json.loads(scores.read_text())["perplexity"]
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("method", "perplexity") if k in row}), flush=True)
    result = {"rows": rows, "eval": "maskpro eval --quick: 16 windows of 512 tokens per set",
              "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "env": environment()}
    path = output_path(a, "cpu-quick.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("cpu-quick"))
