"""TensorRT-LLM engines with 2:4 sparse weights: HF folder -> TRT-LLM checkpoint -> ``trtllm-build --weight_sparsity``.

Written against TensorRT-LLM's TensorRT-engine workflow as documented for 0.9 through 1.2.x (PyPI's newest
is 1.2.1): ``MODEL_MAP[architecture].from_hugging_face(hf_dir, dtype, mapping=Mapping(world_size=tp,
rank=r, tp_size=tp))`` then ``.save_checkpoint(out, save_config=(r == 0))`` per rank (docs
architecture/workflow.md, examples/llama/convert_checkpoint.py), and ``trtllm-build --checkpoint_dir
--output_dir --max_batch_size --max_input_len --max_seq_len --weight_sparsity --workers --gemm_plugin``
(tensorrt_llm/commands/build.py; https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html).
``--weight_sparsity`` sets TensorRT's ``BuilderFlag.SPARSE_WEIGHTS`` (tensorrt_llm/builder.py). It only
acts on GEMMs that are TensorRT layers: with the GEMM plugin (``--gemm_plugin auto``/a dtype) cuBLASLt
runs them dense (NVIDIA/TensorRT-LLM#1559, NVIDIA/Model-Optimizer#1974), so a sparse build disables it.

The TensorRT backend - ``trtllm-build``, ``convert_checkpoint.py``, ``from_hugging_face`` - is removed on
TensorRT-LLM's main branch (docs: legacy/tensorrt-backend-removal.md; first release without it reported as
1.3.0rc23). Newer releases run HF checkpoints on PyTorch with no engine to build; this module then stops with
a one-line error naming a release that still has the backend.

NOT RUN: TensorRT-LLM cannot be installed here (no GPU; the GPU machine has no network). Only the pure
parts (command line, TP pattern rule, checkpoint pattern check) are tested.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from maskpro.checkpoint import atomic_path, save_json
from maskpro.integrity import digest_files
from maskpro.errors import MaskproError
from maskpro.nm import NM, check_weight

from .tensorrt import gpu_info
from .trt_logs import parse_sparsity_log

log = logging.getLogger(__name__)

TRTLLM_PIN = "tensorrt-llm==1.2.1"  # the newest release on PyPI; the TensorRT backend left after 1.2.x
_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp32": "float32", "float32": "float32"}


def _install_hint(kept: Path, what: str) -> str:
    return (f"{what}; on a Linux machine with an NVIDIA GPU (sm80+ for 2:4 sparse tensor cores) run "
            f"`pip install {TRTLLM_PIN}` (a release that still has the TensorRT backend) and retry; {kept} is kept")


def _trtllm_dtype(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise MaskproError(f"dtype {dtype!r} is not one of fp16, bf16, fp32 (or float16, bfloat16, float32)")
    return _DTYPES[dtype]


def tp_pattern_problems(config: dict, tp_size: int, m: int = 4) -> list[str]:
    """Why tensor parallelism would cut the N:M groups of a Llama-style model (empty list = it keeps them).

    Column-parallel layers (q/k/v, gate/up) split the output dimension, which leaves every group whole.
    Row-parallel layers (o_proj, down_proj) split K, so each shard's K must still be a multiple of M.
    """
    if tp_size < 1:
        return [f"tp_size must be >= 1, got {tp_size}"]
    if tp_size == 1:
        return []
    missing = [k for k in ("num_attention_heads", "hidden_size", "intermediate_size") if k not in config]
    if missing:
        return [f"config.json has no {missing[0]}, so the TP split cannot be checked"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    problems = []
    for layer, k in (("o_proj", heads * head_dim), ("down_proj", config["intermediate_size"])):
        if k % tp_size:
            problems.append(f"{layer} K={k} does not split into {tp_size} equal shards")
        elif (k // tp_size) % m:
            problems.append(f"{layer} K={k} / tp {tp_size} = {k // tp_size} is not a multiple of {m}")
    if heads % tp_size or config.get("num_key_value_heads", heads) % tp_size:
        problems.append(f"{heads} attention heads / {config.get('num_key_value_heads', heads)} KV heads do "
                        f"not split over tp {tp_size}")
    return problems


def write_trtllm_checkpoint(hf_folder: str | os.PathLike, out: str | os.PathLike, dtype: str = "float16",
                            tp_size: int = 1) -> dict:
    """Convert a HF folder (e.g. one written by ``maskpro prune``) to a TensorRT-LLM checkpoint at ``out``.

    One ``rank{r}.safetensors`` per TP rank plus ``config.json``; written atomically, then checked so that
    every sparse weight still holds 2:4 along K after TensorRT-LLM's fusing (q/k/v -> qkv) and sharding.
    """
    hf_folder, out = Path(hf_folder), Path(out)
    cfg_file = hf_folder / "config.json"
    if not cfg_file.is_file():
        raise MaskproError(f"{hf_folder} has no config.json; pass a Hugging Face model folder")
    hf_config = json.loads(cfg_file.read_text())
    dtype = _trtllm_dtype(dtype)
    if problems := tp_pattern_problems(hf_config, tp_size):
        raise MaskproError(f"tensor parallelism {tp_size} breaks the 2:4 pattern: {problems[0]}; use a tp_size "
                           "that keeps every shard's K a multiple of 4")
    try:
        from tensorrt_llm.mapping import Mapping
        from tensorrt_llm.models import MODEL_MAP
    except (ImportError, OSError):
        raise MaskproError(_install_hint(hf_folder, "cannot write a TensorRT-LLM checkpoint: tensorrt_llm is not "
                                                    "installed")) from None
    arch = (hf_config.get("architectures") or ["?"])[0]
    model_cls = MODEL_MAP.get(arch)
    if model_cls is None or not hasattr(model_cls, "from_hugging_face"):
        raise MaskproError(f"this TensorRT-LLM has no TensorRT-engine converter for {arch} (its TensorRT backend "
                           f"may be gone); install {TRTLLM_PIN}")
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for rank in range(tp_size):
            mapping = Mapping(world_size=tp_size, rank=rank, tp_size=tp_size)
            model = model_cls.from_hugging_face(str(hf_folder), dtype=dtype, mapping=mapping)
            model.save_checkpoint(str(tmp), save_config=(rank == 0))
            del model
        pattern = check_trtllm_checkpoint(tmp)
        if pattern["broken"]:
            raise MaskproError(f"TensorRT-LLM's conversion broke 2:4 in {pattern['broken'][0]} (and "
                               f"{len(pattern['broken']) - 1} more); {hf_folder} is kept")
    report = {"checkpoint": str(out), "architecture": arch, "dtype": dtype, "tp_size": tp_size,
              "convert_s": round(time.perf_counter() - t0, 2), "pattern": pattern}
    log.info("wrote TensorRT-LLM checkpoint %s (%d sparse weights)", out, len(pattern["sparse"]))
    return report


def check_trtllm_checkpoint(ckpt_dir: str | os.PathLike, nm: NM = NM(2, 4)) -> dict:
    """Sort the 2-D weights of a TensorRT-LLM checkpoint into sparse (N:M along K holds), broken and dense.

    TensorRT-LLM stores a Linear weight as (out, in) like PyTorch. A weight counts as meant to be sparse
    when at least half the zeros the pattern implies are there (25% for 2:4; trained dense weights have
    next to none); such a weight with a group over N non-zeros is "broken".
    """
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("rank*.safetensors"))
    if not files:
        raise MaskproError(f"{ckpt_dir} has no rank*.safetensors; write it with write_trtllm_checkpoint")
    result: dict[str, list[str]] = {"sparse": [], "broken": [], "dense": []}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if not key.endswith(".weight") or len(fh.get_slice(key).get_shape()) != 2:
                    continue
                w = fh.get_tensor(key)
                name = f"{f.stem}:{key}"
                if w.shape[-1] % nm.m or (w == 0).float().mean().item() < (1 - nm.density) / 2:
                    result["dense"].append(name)
                else:
                    result["broken" if check_weight(w, nm, name) else "sparse"].append(name)
    return result


def checkpoint_tp_size(ckpt_dir: str | os.PathLike) -> int:
    """The tensor-parallel size a TensorRT-LLM checkpoint was written for (its config.json mapping)."""
    cfg_file = Path(ckpt_dir) / "config.json"
    if not cfg_file.is_file():
        raise MaskproError(f"{ckpt_dir} has no config.json; write the checkpoint with write_trtllm_checkpoint")
    mapping = json.loads(cfg_file.read_text()).get("mapping", {})
    return int(mapping.get("tp_size", mapping.get("world_size", 1)))


def trtllm_build_command(ckpt_dir: str | os.PathLike, engine_dir: str | os.PathLike, *, sparse: bool = True,
                         max_batch_size: int = 8, max_input_len: int = 1024, max_seq_len: int = 2048,
                         tp: int = 1, gemm_plugin: str | None = None, timing_cache: str | os.PathLike | None = None,
                         log_level: str = "info") -> list[str]:
    """The ``trtllm-build`` argument list for one engine (pure; :func:`build_trtllm_engine` runs it).

    TP itself is fixed when the checkpoint is written; here ``tp`` sets ``--workers`` (ranks built in
    parallel). ``gemm_plugin=None`` means "disable" for a sparse build (see the module docstring) and
    TensorRT-LLM's default otherwise; profiling is detailed so the engine's tactics can be inspected.
    """
    for name, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len),
                        ("max_seq_len", max_seq_len), ("tp", tp)):
        if int(value) < 1:
            raise MaskproError(f"{name} must be >= 1, got {value}")
    if max_input_len > max_seq_len:
        raise MaskproError(f"max_input_len {max_input_len} exceeds max_seq_len {max_seq_len} (prompt + output)")
    cmd = ["trtllm-build", "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(engine_dir),
           "--max_batch_size", str(max_batch_size), "--max_input_len", str(max_input_len),
           "--max_seq_len", str(max_seq_len), "--workers", str(tp), "--profiling_verbosity", "detailed",
           "--log_level", log_level]
    if gemm_plugin is None and sparse:
        gemm_plugin = "disable"
    if gemm_plugin is not None:
        cmd += ["--gemm_plugin", gemm_plugin]
    if sparse:
        cmd.append("--weight_sparsity")
    if timing_cache is not None:
        cmd += ["--input_timing_cache", str(timing_cache), "--output_timing_cache", str(timing_cache)]
    return cmd


def build_trtllm_engine(ckpt_dir: str | os.PathLike, engine_dir: str | os.PathLike, *, sparse: bool = True,
                        max_batch_size: int = 8, max_input_len: int = 1024, max_seq_len: int = 2048,
                        tp: int | None = None, gemm_plugin: str | None = None,
                        timing_cache: str | os.PathLike | None = None, timeout_s: float | None = None) -> dict:
    """Run ``trtllm-build`` into ``engine_dir`` (atomically) and report what TensorRT did with the sparsity.

    The build log is kept as ``engine_dir/build.log``; the report (also ``engine_dir/build-report.json``)
    holds the command, the time, the engine bytes and the "(Sparsity)" lines TensorRT logged.
    """
    ckpt_dir, engine_dir = Path(ckpt_dir), Path(engine_dir)
    ckpt_tp = checkpoint_tp_size(ckpt_dir)
    tp = ckpt_tp if tp is None else tp
    if tp != ckpt_tp:
        raise MaskproError(f"{ckpt_dir} was written for tp {ckpt_tp}, not {tp}; write it again with tp_size={tp}")
    exe = shutil.which("trtllm-build")
    missing = [what for what, ok in (("trtllm-build is not on PATH", exe is not None),
                                     ("no CUDA GPU is visible", gpu_info() is not None)) if not ok]
    if missing:
        raise MaskproError(_install_hint(ckpt_dir, "cannot build a TensorRT-LLM engine: " + " and ".join(missing)))
    t0 = time.perf_counter()
    with atomic_path(engine_dir) as tmp:
        cmd = trtllm_build_command(ckpt_dir, tmp, sparse=sparse, max_batch_size=max_batch_size,
                                   max_input_len=max_input_len, max_seq_len=max_seq_len, tp=tp,
                                   gemm_plugin=gemm_plugin, timing_cache=timing_cache)
        cmd[0] = exe
        tmp.mkdir()
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        (tmp / "build.log").write_text(proc.stdout)
        if proc.returncode != 0:
            last = next((l for l in reversed(proc.stdout.splitlines()) if l.strip()), "no output")
            raise MaskproError(f"trtllm-build failed ({proc.returncode}): {last.strip()[:300]}; the checkpoint "
                               f"{ckpt_dir} is kept")
        sparsity = parse_sparsity_log(proc.stdout)
        report = {"engine": "tensorrt-llm", "checkpoint": str(ckpt_dir), "engine_dir": str(engine_dir),
                  "command": [str(engine_dir) if c == str(tmp) else str(c) for c in cmd],
                  "sparse": sparse, "tp": tp,
                  "build_s": round(time.perf_counter() - t0, 2),
                  "engine_bytes": sum(f.stat().st_size for f in tmp.glob("*.engine")),
                  "files": digest_files(tmp, skip=("build-report.json",)),
                  "sparsity": sparsity.to_dict()}
        if sparse and not sparsity.logged:
            report["note"] = "trtllm-build logged no (Sparsity) lines; rebuild with log_level info to see them"
        save_json(report, tmp / "build-report.json")
    return report
