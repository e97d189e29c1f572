"""TensorRT engines with 2:4 sparse weights from maskpro's ONNX export (``maskpro-export --engine trt``).

Written against the TensorRT Python API as read in the NVIDIA/TensorRT OSS sources of 10.16.1 (commit
5302b288, python/src/infer/pyCore.cpp and its docstrings) and 11.1.0 (commit a892d222). PyPI's newest,
11.4.0.106, was not read; its API is assumed to match 11.1. The differences this module handles:

* 10.x builds either weakly typed (``BuilderFlag.FP16``/``BF16``/``INT8`` let TensorRT lower an fp32 graph;
  deprecated in 10.12, "superseded by strong typing") or strongly typed
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: the graph's own dtypes decide).
* 11.x removed ``BuilderFlag.FP16/BF16/INT8/FP8`` and ``OBEY/PREFER_PRECISION_CONSTRAINTS``; every network is
  strongly typed (``STRONGLY_TYPED`` is "accepted but ignored", ``EXPLICIT_BATCH`` is gone), so the engine's
  precision is the ONNX file's: export the ONNX in fp16/bf16 for an fp16/bf16 engine.
* ``BuilderFlag.SPARSE_WEIGHTS`` is present in both ("Allow the builder to examine weights and use optimized
  functions when weights have suitable sparsity"); ``trtexec --sparsity=force`` is deprecated in favour of
  ``polygraphy surgeon prune``, which maskpro does not need: its weights already hold the pattern.

Target GPUs: sparse tensor cores need sm80+ (A100, H100/H200, L4/L40, Blackwell). On older GPUs the build
runs but TensorRT finds no sparse tactic.

NOT VERIFIED: TensorRT cannot be installed on any machine this was written on (no GPU here; the GPU machine
has no TensorRT and no network). Only the pure helpers are tested: shape profiles, precision planning and the
trtexec command (:mod:`.trt_plan`), the eligibility rules (:mod:`.sparse_rules`) and the log and inspector
parsers (:mod:`.trt_logs`), all importable from here too; ``build_engine`` has never run. Without TensorRT or
a GPU it stops with a one-line :class:`~maskpro.errors.MaskproError` and keeps the ONNX file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from maskpro.checkpoint import atomic_path, save_json
from maskpro.errors import MaskproError
from maskpro.integrity import sha256
from maskpro.nm import NM

from .check import check_onnx
from .sparse_rules import trt_sparse_eligible
from .trt_logs import (InspectorLayer, SparsityReport, inspector_summary, match_candidates, parse_inspector_json,
                       parse_sparsity_log)
from .trt_plan import (LOG_LEVELS, PRECISIONS, PROFILING_VERBOSITY, TRT_PIN, PrecisionPlan, TrtBuildConfig,
                       load_onnx_graph, onnx_float_dtype, onnx_has_qdq, precision_plan, profile_shapes,
                       trtexec_command)

__all__ = ["InspectorLayer", "PRECISIONS", "PrecisionPlan", "SparsityReport", "TRT_PIN", "TrtBuildConfig",
           "build_dense_and_sparse", "build_engine", "gpu_info", "inspector_summary", "match_candidates",
           "onnx_float_dtype", "onnx_has_qdq", "parse_inspector_json", "parse_sparsity_log", "precision_plan",
           "profile_shapes", "require_engine", "trt_sparse_eligible", "trtexec_command"]

log = logging.getLogger(__name__)


def gpu_info() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of the CUDA device, from torch or nvidia-smi; None when none is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            return torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i))  # type: ignore
    except Exception:  # noqa: BLE001 - a broken CUDA install is "no GPU" here, nvidia-smi may still answer
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            name, cap = (s.strip() for s in out.strip().splitlines()[0].rsplit(",", 1))
            major, minor = cap.split(".")
            return name, (int(major), int(minor))
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass
    return None


def _import_tensorrt():
    try:
        import tensorrt

        return tensorrt
    except (ImportError, OSError):  # OSError: the wheel is there but its CUDA libraries are not
        return None


def require_engine(kept: str):
    """(tensorrt module, gpu) or the one-line error naming everything missing; ``kept`` says what survives."""
    trt, gpu = _import_tensorrt(), gpu_info()
    missing = [what for what, ok in (("the tensorrt Python package is not installed", trt is not None),
                                     ("no CUDA GPU is visible", gpu is not None)) if not ok]
    if missing:
        raise MaskproError(f"cannot build a TensorRT engine: {' and '.join(missing)}; on a Linux machine with an "
                           f"NVIDIA GPU (sm80+ for 2:4 sparse tensor cores) run `pip install {TRT_PIN}` and build "
                           f"again; {kept}")
    return trt, gpu


def _make_logger(trt, level: str):
    """A TensorRT logger that keeps every message at or above ``level`` for the report and the sparsity lines."""
    threshold = int(getattr(trt.ILogger.Severity, LOG_LEVELS[level]))

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the binding requires the explicit base init
            self.lines: list[str] = []

        def log(self, severity, msg) -> None:  # called from TensorRT's threads; list.append is atomic
            sev = int(severity)
            if sev <= threshold:
                self.lines.append(f"[{severity.name}] {msg}")
            if sev <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)

    return CapturingLogger()


def _one_line(text: str, limit: int = 300) -> str:
    """TensorRT messages can span lines; MaskproError messages must not."""
    return " ".join(str(text).split())[:limit]


def _write_bytes_atomic(path: Path, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _sparse_candidates(onnx_path: Path, precision: str) -> list[str]:
    """ONNX MatMul/Gemm nodes whose constant weights hold 2:4 along K and pass TensorRT's rules."""
    report = check_onnx(onnx_path, NM(2, 4))
    return [l.name for l in report.layers if l.targeted and l.ok
            and trt_sparse_eligible(l.out_features, l.in_features, precision)[0]]


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 cfg: TrtBuildConfig | None = None) -> dict:
    """Build ``engine_path`` from ``onnx_path``; return (and write beside it as ``*.report.json``) a report.

    Also written beside the engine: ``*.build.log`` (TensorRT's log at ``cfg.log_level``) and
    ``*.layers.json`` (the engine inspector's JSON). Every file is written atomically; a failed build
    leaves no engine and keeps the ONNX file.
    """
    cfg = cfg or TrtBuildConfig()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise MaskproError(f"{onnx_path} does not exist; export it first with maskpro-export --engine onnx")
    trt, (gpu_name, capability) = require_engine(f"the ONNX file {onnx_path} is kept")
    trt_major = int(trt.__version__.split(".")[0])
    graph = load_onnx_graph(onnx_path)  # the graph only; TensorRT's parser reads the weights itself
    shapes = profile_shapes(graph, cfg)
    onnx_dtype = onnx_float_dtype(graph)
    plan = precision_plan(cfg.precision, onnx_dtype, onnx_has_qdq(graph), trt_major)
    del graph
    notes = [plan.note]
    if cfg.sparse and tuple(capability) < (8, 0):
        notes.append(f"{gpu_name} is sm_{capability[0]}{capability[1]}: no sparse tensor cores, expect no sparse "
                     "tactics")

    logger = _make_logger(trt, cfg.log_level)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and trt_major < 11:  # 11.x is always strongly typed and ignores the flag
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # follows external data next to the file
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        first = _one_line(errors[0]) if errors else "no detail"
        raise MaskproError(f"TensorRT's ONNX parser rejected {onnx_path}: {first} ({len(errors)} errors); the ONNX "
                           "file is kept")

    config = builder.create_builder_config()
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if cfg.sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if cfg.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_bytes))
    config.builder_optimization_level = int(cfg.optimization_level)
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, PROFILING_VERBOSITY[cfg.profiling_verbosity])

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in shapes:
            profile.set_shape(tensor.name, *shapes[tensor.name])
        elif any(d < 0 for d in tensor.shape):
            raise MaskproError(f"network input {tensor.name} is dynamic {tuple(tensor.shape)} but the ONNX graph "
                               "declares no dynamic dimension for it; export the ONNX again")
    config.add_optimization_profile(profile)

    cache_path = cfg.timing_cache
    cached = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cached)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(f"timing cache {cache_path} was made on another device/version; started a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log.info("building %s from %s (%s, sparse=%s)", engine_path, onnx_path, cfg.precision, cfg.sparse)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    log_path = engine_path.with_suffix(".build.log")
    _write_bytes_atomic(log_path, ("\n".join(logger.lines) + "\n").encode())
    if serialized is None:
        last = next((l for l in reversed(logger.lines) if l.startswith(("[ERROR]", "[INTERNAL_ERROR]"))),
                    "no error logged")
        raise MaskproError(f"TensorRT could not build {engine_path}: {_one_line(last)}; log in {log_path}, the ONNX "
                           "file is kept")
    _write_bytes_atomic(engine_path, serialized)
    if cache_path:
        _write_bytes_atomic(cache_path, config.get_timing_cache().serialize())

    sparsity = parse_sparsity_log(logger.lines)
    report: dict = {
        "engine": "tensorrt", "tensorrt_version": trt.__version__, "gpu": gpu_name,
        "compute_capability": f"{capability[0]}.{capability[1]}", "onnx": str(onnx_path),
        "engine_path": str(engine_path), "onnx_weight_dtype": onnx_dtype, "precision": cfg.precision,
        "typing": "strong" if plan.strongly_typed or trt_major >= 11 else "weak",
        "builder_flags": list(plan.builder_flags) + (["SPARSE_WEIGHTS"] if cfg.sparse else []),
        "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in shapes.items()},
        "build_s": round(build_s, 2), "engine_bytes": engine_path.stat().st_size, "engine_sha256": sha256(engine_path),
        "sparsity": {"log": sparsity.to_dict()}, "notes": notes, "config": cfg.to_json(),
        "build_log": str(log_path),
    }
    if cfg.profiling_verbosity != "none":
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(serialized)
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        layers_path = engine_path.with_suffix(".layers.json")
        _write_bytes_atomic(layers_path, info.encode())
        report["sparsity"]["inspector"] = inspector_summary(parse_inspector_json(info))
        report["layers_json"] = str(layers_path)
    if cfg.check_weights:
        candidates = _sparse_candidates(onnx_path, cfg.precision)
        report["sparsity"]["onnx_2of4_matmuls"] = match_candidates(candidates, sparsity)
    if cfg.sparse and not sparsity.logged:
        notes.append("TensorRT logged no (Sparsity) lines; build with log_level info or verbose to see them")
    save_json(report, engine_path.with_suffix(".report.json"))
    log.info("built %s in %.1f s: %d layers eligible for sparse math, %d picked sparse", engine_path, build_s,
             len(sparsity.eligible), len(sparsity.picked))
    return report


def build_dense_and_sparse(onnx_path: str | os.PathLike, out_dir: str | os.PathLike,
                           cfg: TrtBuildConfig | None = None) -> dict:
    """Build ``out_dir/dense.plan`` and ``out_dir/sparse.plan`` with the same settings and timing cache.

    The pair shows what SPARSE_WEIGHTS changes (layers picked, engine bytes, build time) on one GPU; a
    latency comparison needs a runtime benchmark on top of the two engines.
    """
    cfg = cfg or TrtBuildConfig()
    out_dir = Path(out_dir)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise MaskproError(f"{onnx_path} does not exist; export it first with maskpro-export --engine onnx")
    require_engine(f"the ONNX file {onnx_path} is kept")  # fail before creating anything
    shared = dict(cfg.to_json(), timing_cache=cfg.timing_cache or out_dir / "timing.cache")
    reports = {}
    for name, sparse in (("dense", False), ("sparse", True)):
        build_cfg = TrtBuildConfig(**{**shared, "sparse": sparse})
        reports[name] = build_engine(onnx_path, out_dir / f"{name}.plan", build_cfg)
    reports["engine_bytes_ratio"] = round(reports["sparse"]["engine_bytes"] / reports["dense"]["engine_bytes"], 4)
    save_json(reports, out_dir / "dense-vs-sparse.json")
    return reports
