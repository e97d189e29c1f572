"""Launchers for external GPU servers: ``vllm serve`` and ``trtllm-serve`` as supervised subprocesses.

These engines bring their own OpenAI-compatible server (same endpoints as ``--backend torch``, plus their own
``/health``), so maskpro does not proxy them: it builds the documented command line, starts it, waits for
``/health``, forwards SIGINT/SIGTERM and returns the child's exit status.

Command lines, as documented (not run here: neither package installs on this CPU-only machine):

* vLLM (``vllm serve`` docs, engine arguments): ``vllm serve MODEL --host H --port P
  --tensor-parallel-size N [--dtype D] [--max-num-seqs B] [--max-model-len L] [--served-model-name NAME]``.
  Serve the checkpoint written by ``maskpro-export SRC --engine vllm --out OUT`` (dense weights with the
  zeros, ``+0.0`` zeros, a weight index so ``masks.safetensors`` is not read as weights); a maskpro
  folder that was not exported is refused with that command.
* TensorRT-LLM (``trtllm-serve`` docs and ``tensorrt_llm/commands/serve.py``): ``trtllm-serve MODEL --host H
  --port P --backend pytorch|tensorrt --tp_size N [--max_batch_size B] [--max_seq_len L]
  [--tokenizer DIR]``. A Hugging Face folder runs on the PyTorch backend; the engine directory of
  ``maskpro-export SRC --engine trtllm --out OUT`` (``OUT/engine``, or ``OUT`` itself) runs on the
  TensorRT backend and needs ``--tokenizer`` (the engine holds no tokenizer). An engine's TP size is fixed
  when its checkpoint is written, so ``--tensor-parallel-size`` must match it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from maskpro.errors import MaskproError
from maskpro.schema import has_meta

log = logging.getLogger(__name__)

VLLM_PIN = "vllm==0.26.0"
TRTLLM_PIN = "tensorrt-llm==1.2.1"   # the newest release on PyPI; same pin as maskpro.export.trtllm
_VLLM_DTYPES = {"auto": "auto", "fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp32": "float32", "float32": "float32"}

__all__ = ["LaunchConfig", "vllm_command", "trtllm_command", "find_executable", "prepare_vllm_model",
           "prepare_trtllm_model", "run_server_process", "health_url", "VLLM_PIN", "TRTLLM_PIN"]


@dataclass
class LaunchConfig:
    """What ``maskpro-serve --backend vllm|trtllm`` passes on to the external server."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_batch_size: int | None = None
    max_model_len: int | None = None
    served_model_name: str | None = None
    tokenizer: str | None = None
    startup_timeout_s: float = 900.0
    extra_args: list[str] = field(default_factory=list)


def _positive(name: str, value: int | None) -> None:
    if value is not None and int(value) < 1:
        raise MaskproError(f"{name} must be >= 1, got {value}")


def _check_port(port: int) -> None:
    if not 1 <= int(port) <= 65535:
        raise MaskproError(f"port must be in 1..65535, got {port}")


def vllm_command(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
                 tensor_parallel_size: int = 1, dtype: str = "auto", max_batch_size: int | None = None,
                 max_model_len: int | None = None, served_model_name: str | None = None,
                 extra_args: Sequence[str] = (), exe: str = "vllm") -> list[str]:
    """The ``vllm serve`` argument list (pure)."""
    _check_port(port)
    _positive("tensor_parallel_size", tensor_parallel_size)
    _positive("max_batch_size", max_batch_size)
    _positive("max_model_len", max_model_len)
    if dtype not in _VLLM_DTYPES:
        raise MaskproError(f"dtype {dtype!r} is not one of auto, fp16, bf16, fp32")
    cmd = [exe, "serve", str(model), "--host", host, "--port", str(port),
           "--tensor-parallel-size", str(tensor_parallel_size), "--dtype", _VLLM_DTYPES[dtype]]
    if max_batch_size is not None:
        cmd += ["--max-num-seqs", str(max_batch_size)]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    return cmd + list(extra_args)


def trtllm_command(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
                   tensor_parallel_size: int = 1, backend: str = "pytorch", max_batch_size: int | None = None,
                   max_seq_len: int | None = None, tokenizer: str | os.PathLike | None = None,
                   extra_args: Sequence[str] = (), exe: str = "trtllm-serve") -> list[str]:
    """The ``trtllm-serve`` argument list (pure)."""
    _check_port(port)
    _positive("tensor_parallel_size", tensor_parallel_size)
    _positive("max_batch_size", max_batch_size)
    _positive("max_seq_len", max_seq_len)
    if backend not in ("pytorch", "tensorrt"):
        raise MaskproError(f"trtllm-serve backend {backend!r} is not pytorch or tensorrt")
    if backend == "tensorrt" and tokenizer is None:
        raise MaskproError("serving a TensorRT-LLM engine needs --tokenizer (the Hugging Face folder it was "
                           "built from): the engine directory holds no tokenizer")
    cmd = [exe, str(model), "--host", host, "--port", str(port), "--backend", backend,
           "--tp_size", str(tensor_parallel_size)]
    if max_batch_size is not None:
        cmd += ["--max_batch_size", str(max_batch_size)]
    if max_seq_len is not None:
        cmd += ["--max_seq_len", str(max_seq_len)]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    return cmd + list(extra_args)


def find_executable(backend: str, path: str | None = None) -> str:
    """The server executable of ``backend`` on PATH, or a one-line error naming the package to install."""
    exe, pin, what = {"vllm": ("vllm", VLLM_PIN, "vLLM"),
                      "trtllm": ("trtllm-serve", TRTLLM_PIN, "TensorRT-LLM")}[backend]
    found = shutil.which(exe, path=path)
    if found is None:
        raise MaskproError(f"{what} is not installed (no `{exe}` on PATH); on a Linux machine with an NVIDIA GPU "
                           f"run: pip install {pin}")
    return found


def _folder(model: str | os.PathLike) -> Path:
    path = Path(model)
    if not path.is_dir():
        raise MaskproError(f"model {str(model)!r} is not a folder; pass a local checkpoint folder")
    return path


def prepare_vllm_model(model: str | os.PathLike) -> Path:
    """Check that ``model`` is a folder vLLM loads: a maskpro vLLM export or a plain HF folder."""
    path = _folder(model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MaskproError(f"{path} has no config.json; pass a Hugging Face folder or a maskpro-export --engine "
                           "vllm output")
    if has_meta(path) and "maskpro" not in json.loads(config_file.read_text()):
        raise MaskproError(f"{path} is a maskpro folder, not a vLLM export; run `maskpro-export {path} --engine vllm "
                           f"--out {path}-vllm` and serve {path}-vllm")
    return path


def _engine_dir(path: Path) -> Path | None:
    """The TensorRT engine directory inside ``path`` (a maskpro-export trtllm output or an engine dir)."""
    for candidate in (path / "engine", path):
        if any(candidate.glob("rank*.engine")):
            return candidate
    return None


def prepare_trtllm_model(model: str | os.PathLike, tensor_parallel_size: int,
                         tokenizer: str | os.PathLike | None) -> tuple[Path, str, Path | None]:
    """(model path, trtllm-serve backend, tokenizer) for a HF folder or a built TensorRT-LLM engine."""
    path = _folder(model)
    engine = _engine_dir(path)
    if engine is None:
        if not (path / "config.json").is_file():
            raise MaskproError(f"{path} is neither a Hugging Face folder (no config.json) nor a TensorRT-LLM engine "
                               "(no rank*.engine)")
        return path, "pytorch", Path(tokenizer) if tokenizer else None
    config = json.loads((engine / "config.json").read_text()) if (engine / "config.json").is_file() else {}
    mapping = (config.get("pretrained_config") or config).get("mapping", {})
    engine_tp = int(mapping.get("tp_size", mapping.get("world_size", 1)))
    if engine_tp != tensor_parallel_size:
        raise MaskproError(f"{engine} was built for tensor parallelism {engine_tp}, not {tensor_parallel_size}; pass "
                           f"--tensor-parallel-size {engine_tp} or export again with --tp {tensor_parallel_size}")
    if tokenizer is None:
        raise MaskproError(f"{engine} is a TensorRT-LLM engine; pass --tokenizer with the Hugging Face folder it was "
                           "built from")
    if not Path(tokenizer).is_dir():
        raise MaskproError(f"--tokenizer {tokenizer} is not a folder")
    return engine, "tensorrt", Path(tokenizer)


def health_url(host: str, port: int, path: str = "/health", scheme: str = "http") -> str:
    """Where to poll a server listening on ``host`` (a wildcard address is polled on loopback)."""
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def run_server_process(cmd: Sequence[str], host: str, port: int, *, startup_timeout_s: float = 900.0,
                       health_path: str = "/health", env: dict | None = None, name: str | None = None,
                       tls: bool = False) -> int:
    """Run a server command until it exits; returns 0 when it stopped because we forwarded a signal.

    Waits for ``health_path`` to answer 200 (logs "ready"), forwards SIGINT and SIGTERM to the child (which
    runs in its own session, so a terminal's Ctrl-C reaches it once), and stops it if it is not healthy
    within ``startup_timeout_s`` (exit 1).
    """
    import httpx

    name = name or Path(cmd[0]).name
    url = health_url(host, port, health_path, "https" if tls else "http")
    log.info("starting: %s", " ".join(cmd))
    child = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + startup_timeout_s
        ready = False
        # our own child on this host: its certificate may be self-signed, and only liveness is asked
        with httpx.Client(timeout=2.0, verify=not tls) as client:
            while child.poll() is None and not forwarded:
                try:
                    if client.get(url).status_code == 200:
                        ready = True
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log.error("%s did not become healthy at %s within %.0f s; stopping it", name, url,
                              startup_timeout_s)
                    _stop(child)
                    return 1
                time.sleep(0.5)
        if ready:
            log.info("%s is ready: %s", name, url.removesuffix(health_path) + "/v1")
        code = child.wait()
        while code is None:  # pragma: no cover - wait() returns the code
            code = child.wait()
        if forwarded and code in (0, -forwarded[-1], 128 + forwarded[-1]):
            return 0
        if not ready and not forwarded:
            log.error("%s exited with code %s before it became healthy", name, code)
        return code if code >= 0 else 128 - code
    finally:
        if child.poll() is None:
            _stop(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(child: subprocess.Popen, timeout_s: float = 30.0) -> None:
    child.terminate()
    try:
        child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
