"""What every results file records (device, driver, CUDA, versions, command, git commit, date) and where it goes."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import resource
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

# Results of a source checkout live next to the scripts (committed); an installed package has no such folder.
RESULTS = Path(__file__).resolve().parent / "results"
INSTALLED_RESULTS = "maskpro-bench-results"

# Engines and libraries whose versions decide what a number means; null when not installed.
_VERSIONED = {"triton": "triton", "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tensorrt": "tensorrt",
              "vllm": "vllm", "tensorrt_llm": "tensorrt-llm", "maskpro": "maskpro"}

_command: list[str] | None = None


def set_command(argv: list[str]) -> None:
    """Record the command line a run was started with (the CLI passes its own argv, not the host's)."""
    global _command
    _command = list(argv)


def command_line() -> str:
    """The command that reproduces this run: ``maskpro-bench ...`` or ``python -m benchmarks.X ...``."""
    if _command is not None:
        return shlex.join(_command)
    script = Path(sys.argv[0])
    if script.suffix == ".py" and script.parent == Path(__file__).resolve().parent:
        package = "benchmarks" if script.parent.name == "benchmarks" else "maskpro.bench"
        return shlex.join(["python", "-m", f"{package}.{script.stem}", *sys.argv[1:]])
    return shlex.join([script.name, *sys.argv[1:]])


def _version(dist: str | tuple[str, ...]) -> str | None:
    for name in (dist,) if isinstance(dist, str) else dist:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD: a checkout copied onto a GPU machine may carry a newer tree
    than its git metadata, and then ``git_commit`` names only the base the tree was changed from."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def environment() -> dict:
    """Device, driver, CUDA, library and engine versions, command, git commit and date of this run."""
    import transformers

    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        **{name: _version(dist) for name, dist in _VERSIONED.items()},
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = _driver()
        env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    else:
        env.update(device="cpu", cuda=None, driver=None, cusparselt=None)
    return env


def device_tag() -> str:
    """A short file-name tag for this machine: ``h100``, ``h200``, ``a100-sxm4-80gb`` ... or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", torch.cuda.get_device_name().lower())
    return re.sub(r"[^a-z0-9]+", "-", name.split()[0]).strip("-") or "gpu"


def results_dir(out_dir: str | Path | None = None) -> Path:
    """``--out-dir``, else ``benchmarks/results`` in a source checkout, else ``./maskpro-bench-results``."""
    path = Path(out_dir) if out_dir else RESULTS if RESULTS.is_dir() else Path.cwd() / INSTALLED_RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_output_args(p: argparse.ArgumentParser, default_name: str) -> None:
    """``--out-dir`` / ``--out``, the same on every subcommand."""
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=None,
                   help=f"folder for results (default: benchmarks/results in a source checkout, else "
                        f"./{INSTALLED_RESULTS})")
    g.add_argument("--out", default=None, help=f"exact JSON path instead of OUT_DIR/{default_name}")


def output_path(a: argparse.Namespace, name: str) -> Path:
    """Where this run's JSON goes (``--out`` wins over ``--out-dir``)."""
    if a.out:
        path = Path(a.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    return results_dir(a.out_dir) / name


def fill_defaults(a: argparse.Namespace, preset: dict) -> argparse.Namespace:
    """Options left at None take the preset's value (GPU/CPU or quick/full defaults without hiding overrides)."""
    for key, value in preset.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def peak_memory() -> dict:
    """Peak memory so far: CUDA allocator peak (since the last reset) on GPU, process peak RSS on CPU."""
    if torch.cuda.is_available():
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def merge_json(path: Path, update: dict) -> dict:
    """Merge ``update`` into the JSON at ``path`` (nested dicts merge; other values replace), atomically."""
    from maskpro.checkpoint import save_json

    old = json.loads(path.read_text()) if path.is_file() else {}

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    out = merge(old, update)
    save_json(out, path)
    return out
