"""``maskpro-serve``: an OpenAI-compatible server for a maskpro (or any Hugging Face causal LM) checkpoint.

``--backend torch`` (default) serves in this process: uvicorn + :mod:`maskpro.serve.server` over
:class:`maskpro.serve.engine.TorchEngine`. ``--backend vllm`` / ``trtllm`` run ``vllm serve`` /
``trtllm-serve`` as a supervised subprocess (:mod:`maskpro.serve.backends`). Errors are one line on stderr
with exit code 2 (:mod:`maskpro.errors`); SIGTERM or Ctrl-C shuts down gracefully with exit code 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import uvicorn

from maskpro.cliparse import Parser
from maskpro.errors import MaskproError, run_cli

log = logging.getLogger("maskpro.serve")

_EPILOG = """backends:
  torch   in-process PyTorch engine with continuous batching (CPU or one CUDA GPU); 2:4 layers go through
          maskpro.serve.sparse_linear
  vllm    `vllm serve` on a `maskpro-export --engine vllm` folder (needs: pip install vllm==0.26.0)
  trtllm  `trtllm-serve` on a HF folder (PyTorch backend) or a `maskpro-export --engine trtllm` engine
          (TensorRT backend, needs --tokenizer; pip install tensorrt-llm==1.2.1)

examples:
  maskpro-serve runs/smollm2-2of4
  maskpro-serve runs/smollm2-2of4 --port 8001 --max-batch-size 16 --max-tokens 512
  maskpro-serve runs/smollm2-2of4-vllm --backend vllm --tensor-parallel-size 2
  maskpro-serve runs/smollm2-2of4-vllm --backend vllm -- --quantization maskpro   (args after -- go to vllm)
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="maskpro-serve", epilog=_EPILOG,
                usage="%(prog)s MODEL [options] [-- ENGINE_ARGS...]",
                description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                            "/v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("model", help="model folder (maskpro prune output, any HF causal LM folder, a .gguf file, or "
                                 "'smollm2-135m-instruct'); for vllm/trtllm the exported folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=("torch", "vllm", "trtllm"), default="torch")  # the keys of BACKENDS
    p.add_argument("--device", default="auto", help="torch backend: auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16", "float32", "float16",
                                                       "bfloat16"))
    p.add_argument("--max-batch-size", type=int, default=None, help="rows decoded together (32 when not given)")
    p.add_argument("--max-queue", type=int, default=128, help="torch: requests waiting before 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the "
                                                                        "model's context minus one)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for "
                                                                 "(1024 when not given)")
    p.add_argument("--timeout", type=float, default=300.0, help="torch: seconds a request may take, queue "
                                                                "included, before 504")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm/trtllm: GPUs per model")
    p.add_argument("--served-model-name", default=None, help="the id clients send as 'model' (default: folder name)")
    p.add_argument("--no-sparse", action="store_true", help="torch: keep dense linears (skip sparsify)")
    p.add_argument("--kv-cache", default="auto", choices=("auto", "static", "dynamic"),
                   help="torch: 'static' keeps each running request in a preallocated slot (decode can replay "
                        "CUDA graphs; memory: rows x (max prompt + max tokens)); 'dynamic' grows the cache per "
                        "step; auto: static on a GPU when it fits in half the free memory (default)")
    p.add_argument("--runtime", default="auto", choices=("auto", "fast", "transformers"),
                   help="torch: 'fast' runs maskpro's compiled Llama-family decoder (2:4 weights held compressed "
                        "only, decode from CUDA graphs); 'transformers' the transformers model with 2:4 layers "
                        "swapped in; auto: fast for Llama/Mistral/Qwen2 models on a GPU (default)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="torch with the static KV cache on a GPU: replay decode steps from CUDA graphs")
    p.add_argument("--threads", type=int, default=None, help="torch on CPU: intra-op threads (default: cores "
                                                             "minus one, leaving a core for HTTP)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise; /health and /metrics stay "
                        "open); default: the MASKPRO_API_KEY environment variable, else no key. Passed to vLLM "
                        "for --backend vllm")
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (with --ssl-certfile)")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (with --ssl-keyfile)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds in-flight requests get to finish "
                                                                       "after SIGTERM")
    p.add_argument("--tokenizer", default=None, help="trtllm: tokenizer folder of a TensorRT-LLM engine")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="vllm/trtllm: seconds to wait for /health")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to vllm serve / trtllm-serve unchanged
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    a = build_parser().parse_args(argv)
    a.engine_args = extra
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli("maskpro-serve", lambda: _serve(a), "the server stopped")


def _serve(a: argparse.Namespace) -> int:
    _check_args(a)
    return BACKENDS[a.backend].serve(a)


def _check_args(a: argparse.Namespace) -> None:
    for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens", "tensor_parallel_size", "threads"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise MaskproError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= a.port <= 65535:
        raise MaskproError(f"--port must be in 0..65535, got {a.port}")
    if not a.timeout > 0 or a.shutdown_grace < 0 or not a.startup_timeout > 0:
        raise MaskproError("--timeout and --startup-timeout must be > 0 and --shutdown-grace >= 0")
    if a.backend == "torch" and a.engine_args:
        raise MaskproError(f"arguments after -- ({' '.join(a.engine_args)}) are for --backend vllm or trtllm")
    if a.api_key is None:
        a.api_key = os.environ.get("MASKPRO_API_KEY") or None
    if a.api_key is not None and not a.api_key.strip():
        raise MaskproError("--api-key is empty; give a key, or leave it out to serve without one")
    if a.api_key and a.backend == "trtllm":
        raise MaskproError("trtllm-serve takes no API key; serve it behind a proxy that checks one, or use "
                           "--backend torch or vllm")
    if (a.ssl_keyfile is None) != (a.ssl_certfile is None):
        raise MaskproError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for flag, path in (("--ssl-keyfile", a.ssl_keyfile), ("--ssl-certfile", a.ssl_certfile)):
        if path is not None and not os.path.isfile(path):
            raise MaskproError(f"{flag} {path} does not exist; give the path of a PEM file")
    if a.backend == "torch" and a.tensor_parallel_size != 1:
        raise MaskproError("the torch backend runs on one device; --tensor-parallel-size needs --backend vllm or "
                           "trtllm")


# ------------------------------------------------------------------------------------------------ torch

def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails fast with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MaskproError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_torch(a: argparse.Namespace) -> int:
    from maskpro.models import resolve_model_path

    from .config import EngineConfig
    from .engine import TorchEngine
    from .loading import resolve_device
    from .server import ServerConfig, create_app

    threads = a.threads
    if threads is None and a.device in ("auto", "cpu"):
        threads = max(1, (os.cpu_count() or 1) - 1)
    cfg = EngineConfig(model=a.model, device=a.device, dtype=a.dtype, sparse=not a.no_sparse,
                       max_batch_size=a.max_batch_size or 32, max_queue=a.max_queue,
                       max_prompt_tokens=a.max_prompt_tokens, max_new_tokens=a.max_tokens or 1024,
                       request_timeout_s=a.timeout, kv_cache=a.kv_cache, cuda_graphs=a.cuda_graphs, threads=threads,
                       runtime=a.runtime,
                       served_model_name=a.served_model_name)
    resolve_model_path(a.model)      # a bad folder or device fails before the port is taken
    resolve_device(a.device)
    sock = _bind(a.host, a.port)
    try:
        try:
            engine = TorchEngine(cfg)
        except MaskproError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MaskproError(f"cannot load {a.model}: {first}") from None
        grace = a.shutdown_grace
        app = create_app(engine, ServerConfig(shutdown_grace_s=grace, api_key=a.api_key))
        config = uvicorn.Config(app, log_level=a.log_level, access_log=a.access_log, lifespan="on",
                                timeout_graceful_shutdown=grace + 10.0, timeout_keep_alive=5,
                                ssl_keyfile=a.ssl_keyfile, ssl_certfile=a.ssl_certfile)
        server = GracefulServer(config, on_shutdown=lambda: engine.begin_shutdown(grace))
        port = sock.getsockname()[1]
        log.info("serving %s at http://%s:%d/v1 (torch, %s, %s, sparse backend: %s)", engine.model_id, a.host, port,
                 engine.device, str(engine.dtype).removeprefix("torch."), engine.sparsity.get("backend"))
        _quiet_reraised_signals()
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        sock.close()


def _quiet_reraised_signals() -> None:
    """uvicorn re-raises a caught SIGINT/SIGTERM after its graceful shutdown, with the previous handler;
    make that handler a no-op so a requested shutdown exits 0 rather than dying by the signal."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)


class GracefulServer(uvicorn.Server):
    """Tells the engine to drain (new requests 503, running ones get the grace period) before uvicorn closes
    the listening socket and waits for open connections."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets=sockets)


# --------------------------------------------------------------------------------------------- external

def serve_external(a: argparse.Namespace) -> int:
    from . import backends

    # the key goes to vLLM through its environment, not its command line, where any local user could read it
    env = {**os.environ, "VLLM_API_KEY": a.api_key} if a.api_key else None
    return backends.run_server_process(external_command(a), a.host, a.port, startup_timeout_s=a.startup_timeout,
                                       env=env, tls=a.ssl_keyfile is not None)


def external_command(a: argparse.Namespace) -> list[str]:
    """The ``vllm serve`` / ``trtllm-serve`` command line for the parsed arguments (checks included).

    ``--tensor-parallel-size N`` becomes vLLM's ``--tensor-parallel-size N`` and trtllm-serve's ``--tp_size N``
    (a TensorRT-LLM engine's TP size is fixed at ``maskpro-export --engine trtllm --tp N`` and must match).
    """
    if a.port == 0:
        raise MaskproError(f"--backend {a.backend} needs an explicit --port")
    if a.device not in ("auto", "cuda"):
        raise MaskproError(f"--backend {a.backend} runs on CUDA GPUs; drop --device {a.device}")
    ignored = [flag for flag, used in (("--no-sparse", a.no_sparse), ("--no-cuda-graphs", not a.cuda_graphs),
                                       ("--kv-cache", a.kv_cache != "auto"), ("--runtime", a.runtime != "auto"),
                                       ("--threads", a.threads is not None), ("--timeout", a.timeout != 300.0),
                                       ("--max-queue", a.max_queue != 128)) if used]
    if ignored:
        log.warning("%s apply to --backend torch only; ignored", ", ".join(ignored))
    max_len = (a.max_prompt_tokens + (a.max_tokens or 1024)) if a.max_prompt_tokens else None
    return BACKENDS[a.backend].command(a, max_len)


def _vllm_command(a: argparse.Namespace, max_len: int | None) -> list[str]:
    from . import backends

    model = backends.prepare_vllm_model(a.model)
    exe = backends.find_executable("vllm")
    cmd = backends.vllm_command(model, host=a.host, port=a.port, tensor_parallel_size=a.tensor_parallel_size,
                                dtype=a.dtype, max_batch_size=a.max_batch_size, max_model_len=max_len,
                                served_model_name=a.served_model_name, exe=exe,
                                extra_args=[*a.engine_args, *(["--ssl-keyfile", a.ssl_keyfile, "--ssl-certfile",
                                                               a.ssl_certfile] if a.ssl_keyfile else [])])
    return cmd


def _trtllm_command(a: argparse.Namespace, max_len: int | None) -> list[str]:
    from . import backends

    model, trt_backend, tokenizer = backends.prepare_trtllm_model(a.model, a.tensor_parallel_size, a.tokenizer)
    exe = backends.find_executable("trtllm")
    if a.dtype != "auto" or a.served_model_name:
        log.warning("trtllm-serve takes the dtype from the checkpoint and names the model by its path; "
                    "--dtype/--served-model-name ignored")
    return backends.trtllm_command(model, host=a.host, port=a.port, tensor_parallel_size=a.tensor_parallel_size,
                                   backend=trt_backend, max_batch_size=a.max_batch_size, max_seq_len=max_len,
                                   tokenizer=tokenizer, extra_args=a.engine_args, exe=exe)


@dataclass(frozen=True)
class Backend:
    """One way to serve: in this process (``command`` None), or an engine's own server run as a supervised
    subprocess from the command line ``command(args, max_model_len)`` builds."""

    name: str
    serve: Callable[[argparse.Namespace], int]
    command: Callable[[argparse.Namespace, int | None], list[str]] | None = None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", serve_torch),
    Backend("vllm", serve_external, _vllm_command),
    Backend("trtllm", serve_external, _trtllm_command),
)}


if __name__ == "__main__":
    sys.exit(main())
