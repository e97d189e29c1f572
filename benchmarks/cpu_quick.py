"""The CPU recipe measured: ``maskpro prune --preset cpu-quick`` against dense and SparseGPT alone.

  maskpro-bench cpu-quick                     # minutes on a 2-core CPU (docs/robustness.md)
  maskpro-bench cpu-quick --only ft --ft-steps 120    # adds the preset + sparse fine-tune row (about 30 min)

Runs, on this machine's CPU and through the same command line a user types: the dense model, SparseGPT with
the preset's calibration (16 windows of 512 C4 tokens), and the preset itself (SparseGPT, one block re-fit
epoch, 20 MaskPro steps); each is scored with ``maskpro eval --quick`` (WikiText-2 and C4, 16 windows of 512
tokens). Wall times include loading and saving. With ``--ft-steps N`` a fourth row adds N steps of sparse
fine-tuning against the dense model (``--ft-lr``, 8 rows of 128 tokens a step) to the preset. ``--only``
runs some rows and merges them into an existing ``cpu-quick.json``. Writes ``cpu-quick.json``.
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
from maskpro.errors import MaskproError
from maskpro.schema import METADATA, read_meta

from .env import add_output_args, environment, output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: ../shared/data)")
    p.add_argument("--ft-steps", type=int, default=0, help="add a row: the preset plus this many fine-tune steps")
    p.add_argument("--ft-lr", type=float, default=1e-3, help="the fine-tune row's peak step size")
    p.add_argument("--only", nargs="+", default=None, choices=list(ROWS),
                   help="run only these rows and merge them into an existing output")
    add_output_args(p, "cpu-quick.json")


ROWS = {"dense": "dense", "sparsegpt": "sparsegpt (same calibration)", "preset": "cpu-quick preset",
        "ft": "cpu-quick preset + sparse fine-tune"}


def timed(argv: list[str]) -> float:
    """Run one ``maskpro`` command in this process; its wall time in seconds (a failure stops the benchmark)."""
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
            ROWS["dense"]: None,
            ROWS["sparsegpt"]: ["--method", "sparsegpt", "--calib-samples", str(preset["calib_samples"]),
                                "--calib-seq-len", str(preset["calib_seq_len"]), "--device", "cpu"],
            ROWS["preset"]: ["--preset", "cpu-quick"],
        }
        if a.ft_steps:
            runs[ROWS["ft"]] = ["--preset", "cpu-quick", "--ft-steps", str(a.ft_steps), "--ft-lr", str(a.ft_lr),
                                "--ft-batch-size", "8", "--ft-seq-len", "128", "--ft-warmup", "10"]
        if a.only:
            if "ft" in a.only and not a.ft_steps:
                raise MaskproError("--only ft needs --ft-steps N (the fine-tune row's length)")
            runs = {k: v for k, v in runs.items() if k in {ROWS[o] for o in a.only}}
        for name, prune_args in runs.items():
            row: dict = {"method": name}
            model = common
            if prune_args is not None:
                out = Path(tmp) / name.replace(" ", "-")
                row["prune_argv"] = ["maskpro", "prune", *prune_args, "--out", "OUT"]
                row["prune_s"] = timed(["prune", *common, *prune_args, "--out", str(out), "-q"])
                model = ["--model", str(out), *data]
                row[METADATA] = {k: v for k, v in read_meta(out).to_dict().items()
                                 if k in ("method", "calibration", "learner", "refit_before_learning", "finetune")}
            scores = Path(tmp) / f"{name.replace(' ', '-')}-eval.json"
            row["eval_s"] = timed(["eval", *model, "--quick", "--device", "cpu", "-q", "--json", str(scores)])
            row["perplexity"] = json.loads(scores.read_text())["perplexity"]
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("method", "perplexity") if k in row}), flush=True)
    path = output_path(a, "cpu-quick.json")
    env = environment()
    for row in rows:
        row["command"] = env["command"]
    if a.only and path.is_file():  # keep the other rows, in their order; replaced rows keep their place
        before = json.loads(path.read_text())
        old = [{"command": before.get("env", {}).get("command"), **r} for r in before["rows"]]
        new = {r["method"]: r for r in rows}
        rows = [new.pop(r["method"], r) for r in old] + list(new.values())
    result = {"rows": rows, "eval": "maskpro eval --quick: 16 windows of 512 tokens per set",
              "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "env": env}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("cpu-quick"))
