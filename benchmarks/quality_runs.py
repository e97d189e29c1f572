"""The quality matrix as separate, resumable runs: one process per (method, seed), several at once.

A full-size pipeline takes minutes on a GPU, a table of methods x seeds takes an hour, and a command on the
GPU machine may last ten minutes. With ``--workdir DIR`` every (method, seed) gets its own folder: the
pruning pipeline keeps its caches and checkpoints there, the run writes its rows there when it ends, and the
same command run again skips finished runs and resumes the others from their checkpoints. ``--jobs K`` runs
K at once, round-robin over the visible GPUs (a 135M model leaves most of a GPU idle), and when all are done
their rows are merged into the results file, whose aggregates and headline are then computed as usual.
Each run's log is ``DIR/<run>/log.txt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from maskpro.checkpoint import save_json
from maskpro.errors import MaskproError

from . import quality
from .env import command_line, merge_json, set_command

log = logging.getLogger(__name__)

START = "--- run started"  # the log line of every attempt at a run

# Options that say how runs are scheduled and where results go, not what a run computes.
_NOT_IN_KEY = {"workdir", "jobs", "out", "out_dir", "methods", "seeds", "seed", "headline", "prior", "run",
               "subcommand"}


def run_key(a: argparse.Namespace, name: str, seed: int) -> dict:
    """Everything that decides one run's rows: a finished run is reused only under the same key."""
    tune = quality.split_ft(name)[1]
    key = {k: v for k, v in sorted(vars(a).items())
           if k not in _NOT_IN_KEY and (tune or not (k.startswith("ft_") or k == "self_gen_rows"))}
    return {**key, "method": name, "seed": seed}


def run_dir(workdir: Path, name: str, seed: int) -> Path:
    return workdir / f"{re.sub(r'[^A-Za-z0-9.@+-]+', '_', name)}-seed{seed}"


def finished(folder: Path, key: dict) -> dict | None:
    """The rows of a run that ended under ``key``, or None (never run, unfinished, or other settings)."""
    path = folder / "done.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done["rows"] if done.get("key") == key else None


def _gpu_env(i: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(d) for d in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
    return env


def run_all(a: argparse.Namespace, device: str, seeds: list[int], out: Path) -> None:
    """Run every (method, seed) of ``a`` as its own process, ``a.jobs`` at once; merge their rows into ``out``."""
    if a.jobs < 1:
        raise MaskproError(f"--jobs must be at least 1, got {a.jobs}")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    todo, rows = [], {}
    for name in a.methods:
        for seed in seeds:
            folder, key = run_dir(workdir, name, seed), run_key(a, name, seed)
            done = finished(folder, key)
            if done is not None:
                log.info("%s seed %d: finished by an earlier run, rows reused from %s", name, seed, folder)
                rows.update(done)
            else:
                todo.append((name, seed, folder, key))
    print(f"quality runs: {len(todo)} to run, {len(a.methods) * len(seeds) - len(todo)} finished before, "
          f"{a.jobs} at once, logs in {workdir}/*/log.txt", flush=True)
    try:
        failed = _schedule(a, todo, seeds, max(1, (os.cpu_count() or 1) // a.jobs))
    finally:  # also when stopped: the runs that finished are in the results file
        for name, seed, folder, key in todo:
            done = finished(folder, key)
            if done is not None:
                rows.update(done)
        if rows:
            merge_json(out, {"methods": {label: r["row"] for label, r in rows.items()},
                             "env": {label: r["env"] for label, r in rows.items()},
                             **{k: v for r in rows.values() for k, v in r["file"].items()}})
    if failed:
        raise MaskproError(f"{len(failed)} quality run(s) failed: {', '.join(failed)}; see log.txt in each folder "
                           f"under {workdir}, fix, and run the same command again (finished runs are kept)")


def _schedule(a, todo: list, seeds: list[int], threads: int) -> list[str]:
    """Start runs as slots free up; on SIGTERM (a command time limit) stop them all, keeping their checkpoints."""
    pending, running, failed = list(todo), {}, []

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, stop)
    slot = 0
    try:
        while pending or running:
            while pending and len(running) < a.jobs:
                name, seed, folder, key = pending.pop(0)
                running[_start(a, name, seed, folder, key, seeds, _gpu_env(slot, threads))] = (name, seed, time.time())
                slot += 1
            time.sleep(1)
            for proc in [p for p in running if p.poll() is not None]:
                name, seed, t0 = running.pop(proc)
                ok = proc.returncode == 0
                print(f"quality runs: {name} seed {seed} {'finished' if ok else 'FAILED'} after "
                      f"{(time.time() - t0) / 60:.1f} min", flush=True)
                if not ok:
                    failed.append(f"{name} seed {seed}")
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        signal.signal(signal.SIGTERM, old)
    return failed


def _start(a, name: str, seed: int, folder: Path, key: dict, seeds: list[int], env: dict) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"args": {**{k: v for k, v in vars(a).items() if k not in ("run",)}, "methods": [name], "seed": seed,
                     "seeds": None, "headline": None, "prior": None, "workdir": None, "run_dir": str(folder),
                     "out": str(folder / "rows.json"), "suffix": quality.seed_suffix(seed, seeds)},
            "key": key, "command": command_line()}
    save_json(spec, folder / "spec.json")
    logf = open(folder / "log.txt", "a")
    logf.write(f"{START} {time.strftime('%Y-%m-%d %H:%M:%S')} (resuming from the checkpoints here, if any)\n")
    logf.flush()
    return subprocess.Popen([sys.executable, "-m", f"{__package__}.quality_runs", str(folder / "spec.json")],
                            stdout=logf, stderr=subprocess.STDOUT, env=env)


def child(spec_path: str) -> int:
    """One run: prune, evaluate, record its rows in its folder, then mark it finished under its key."""
    spec = json.loads(Path(spec_path).read_text())
    a = argparse.Namespace(**spec["args"])
    set_command(shlex.split(spec["command"]))  # the results name the command that scheduled the run
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out)
    out.unlink(missing_ok=True)  # rows of an interrupted evaluation are measured again
    quality.measure(a.methods[0], a, device, quality.recorder(a, out), a.suffix)
    written = json.loads(out.read_text())
    # A resumed run's prune_s counts only its last attempt; the attempts say so.
    attempts = (Path(a.run_dir) / "log.txt").read_text().count(START)
    rows = {label: {"row": {**row, "attempts": attempts}, "env": written["env"][label],
                    "file": {k: written[k] for k in ("model", "dtype", "ppl_seq_len", "device", "quick")
                             if k in written}}
            for label, row in written["methods"].items()}
    save_json({"key": spec["key"], "rows": rows}, Path(a.run_dir) / "done.json")
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1]))
