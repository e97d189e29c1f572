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
has no TensorRT and no network). Only the pure helpers (shape profiles, eligibility rules, log and inspector
parsers, precision planning, trtexec command) are tested; ``build_engine`` has never run. Without TensorRT or
a GPU it stops with a one-line :class:`~maskpro.errors.MaskproError` and keeps the ONNX file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from maskpro.checkpoint import atomic_path, save_json
from maskpro.integrity import sha256
from maskpro.errors import MaskproError

log = logging.getLogger(__name__)

# The version the install hint names: the newest 10.x, whose sources this module was read against and
# whose weakly typed FP16 flag lets an fp32 ONNX build an fp16 engine. 11.x works too with an fp16 ONNX.
TRT_PIN = "tensorrt==10.16.1.11"
PRECISIONS = ("fp16", "bf16", "fp32", "int8")
_VERBOSITY = {"detailed": "DETAILED", "layer_names_only": "LAYER_NAMES_ONLY", "none": "NONE"}
_LOG_LEVELS = {"error": "ERROR", "warning": "WARNING", "info": "INFO", "verbose": "VERBOSE"}


# ----------------------------------------------------------------------------------------------- config

def _triple(name: str, value: Iterable[int], lowest: int) -> tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise MaskproError(f"{name} must be three integers (min, opt, max), got {value!r}") from None
    if len(t) != 3 or not lowest <= t[0] <= t[1] <= t[2]:
        raise MaskproError(f"{name} must be (min, opt, max) with {lowest} <= min <= opt <= max, got {value!r}")
    return t  # type: ignore[return-value]


@dataclass
class TrtBuildConfig:
    """How to build one engine; the shape ranges become TensorRT's single optimization profile.

    ``total_sequence`` (the attention mask's length) is not set on its own: it is past + sequence, so an
    engine never accepts a mask that disagrees with its KV cache.
    """

    precision: str = "fp16"                         # fp16 | bf16 | fp32 | int8 (int8: Q/DQ ONNX only)
    sparse: bool = True                             # BuilderFlag.SPARSE_WEIGHTS
    batch: tuple[int, int, int] = (1, 1, 8)         # (min, opt, max)
    sequence: tuple[int, int, int] = (1, 128, 1024)  # new tokens per call: prefill up to max, decode = 1
    past: tuple[int, int, int] = (0, 512, 1024)     # cached tokens; 0 = prefill (empty tensors are allowed)
    timing_cache: Path | None = None                # loaded if present, written back after the build
    workspace_bytes: int | None = None              # None: TensorRT's default (the whole device)
    optimization_level: int = 3                     # builder_optimization_level 0..5, TensorRT's default 3
    profiling_verbosity: str = "detailed"           # detailed is what exposes tactics to the inspector
    log_level: str = "info"                         # the sparsity lines are INFO; "verbose" keeps everything
    check_weights: bool = True                      # read the ONNX weights to list the 2:4 MatMuls expected

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise MaskproError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        self.batch = _triple("batch", self.batch, 1)
        self.sequence = _triple("sequence", self.sequence, 1)
        self.past = _triple("past", self.past, 0)
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)
        if self.workspace_bytes is not None and int(self.workspace_bytes) <= 0:
            raise MaskproError(f"workspace_bytes must be positive or None, got {self.workspace_bytes}")
        if not 0 <= int(self.optimization_level) <= 5:
            raise MaskproError(f"optimization_level must be 0..5 (TensorRT's builder levels), got "
                               f"{self.optimization_level}")
        if self.profiling_verbosity not in _VERBOSITY:
            raise MaskproError(f"profiling_verbosity must be one of {', '.join(_VERBOSITY)}")
        if self.log_level not in _LOG_LEVELS:
            raise MaskproError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")

    @property
    def total(self) -> tuple[int, int, int]:
        return tuple(p + s for p, s in zip(self.past, self.sequence))  # type: ignore[return-value]

    def to_json(self) -> dict:
        d = asdict(self)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return d


# ----------------------------------------------------------------------------------- shape profiles

# Symbolic dimension names -> the range they take. maskpro's exporter writes the first name of each set;
# the others are what Optimum / ONNX Runtime GenAI style exports use, so their graphs build too.
_DIM_NAMES = {
    "batch": {"batch", "batch_size", "batchsize", "n", "b"},
    "sequence": {"sequence", "sequence_length", "seq", "seq_len", "seq_length", "num_tokens",
                 "decoder_sequence_length"},
    "past_sequence": {"past_sequence", "past_sequence_length", "past_seq_len", "past_length", "past_len",
                      "past_key_values_length", "cache_length"},
    "total_sequence": {"total_sequence", "total_sequence_length", "total_length", "total_seq_len",
                       "attention_mask_sequence_length", "past_sequence_length+1"},
}
# Where a dimension has no usable name, the axis of a known input says what it is (the exporter's contract).
_POSITIONAL = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
               "attention_mask": {0: "batch", 1: "total_sequence"}}
_KV_INPUT = re.compile(r"^past_key_values\.\d+\.(key|value)$")


def _dim_kind(param: str) -> str | None:
    """Map a dim_param string to batch / sequence / past_sequence / total_sequence (None if unknown)."""
    p = re.sub(r"\s+", "", param.strip().lower())
    for kind, names in _DIM_NAMES.items():
        if p in names:
            return kind
    if "+" in p:  # "past_sequence + sequence" and the like: a sum of past and new tokens is the total
        parts = {_dim_kind(x) for x in p.split("+")}
        if parts == {"past_sequence", "sequence"}:
            return "total_sequence"
    return None


def _positional_kind(input_name: str, axis: int) -> str | None:
    if _KV_INPUT.match(input_name):
        return {0: "batch", 2: "past_sequence"}.get(axis)
    return _POSITIONAL.get(input_name, {}).get(axis)


def _load_onnx(onnx_model_or_path: Any, load_data: bool = False):
    """An ``onnx.ModelProto`` as given, or read from a path (without its external weights by default)."""
    import onnx

    if isinstance(onnx_model_or_path, onnx.ModelProto):
        return onnx_model_or_path
    path = Path(onnx_model_or_path)
    if not path.is_file():
        raise MaskproError(f"{path} does not exist; pass the model.onnx written by maskpro-export --engine onnx")
    try:
        return onnx.load(str(path), load_external_data=load_data)
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a bad file
        raise MaskproError(f"{path} is not a readable ONNX model ({type(e).__name__}); export it again") from None


def _graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}  # old IR versions list weights as inputs too
    return [i for i in model.graph.input if i.name not in inits]


def profile_shapes(onnx_model_or_path: Any, cfg: TrtBuildConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes for every graph input with a dynamic dimension, read from its ONNX shape.

    Dimensions are resolved by their symbolic name (dim_param), else by their axis on one of the known
    inputs (input_ids, attention_mask, position_ids, past_key_values.{i}.key/value); static dimensions are
    copied into all three shapes. An unknown dynamic dimension is an error, not a guess: its range decides
    how much memory the engine reserves.
    """
    model = _load_onnx(onnx_model_or_path)
    ranges = {"batch": cfg.batch, "sequence": cfg.sequence, "past_sequence": cfg.past,
              "total_sequence": cfg.total}
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for inp in _graph_inputs(model):
        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            raise MaskproError(f"ONNX input {inp.name} has no shape; export the model again with shapes")
        dims: list[tuple[int, int, int]] = []
        dynamic = False
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append((d.dim_value,) * 3)
                continue
            dynamic = True
            param = d.dim_param if d.HasField("dim_param") else ""
            kind = (_dim_kind(param) if param else None) or _positional_kind(inp.name, axis)
            if kind is None:
                raise MaskproError(f"ONNX input {inp.name} axis {axis} is dynamic ({param or 'unnamed'}) and has "
                                   "no known range; name it batch, sequence, past_sequence or total_sequence")
            dims.append(ranges[kind])
        if dynamic:
            shapes[inp.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return shapes


# --------------------------------------------------------------------------------- precision planning

def onnx_float_dtype(onnx_model_or_path: Any) -> str | None:
    """The dtype holding most float weights of the graph: fp32, fp16, bf16 (None when it has none)."""
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
    counts: dict[str, int] = {}
    for t in _load_onnx(onnx_model_or_path).graph.initializer:
        if t.data_type in names:
            counts[names[t.data_type]] = counts.get(names[t.data_type], 0) + math.prod(t.dims)
    return max(counts, key=counts.get) if counts else None


def onnx_has_qdq(onnx_model_or_path: Any) -> bool:
    """True when the graph is explicitly quantized (QuantizeLinear / DequantizeLinear nodes)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for n in _load_onnx(onnx_model_or_path).graph.node)


@dataclass(frozen=True)
class PrecisionPlan:
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # BuilderFlag member names to set besides SPARSE_WEIGHTS
    note: str


def precision_plan(precision: str, onnx_dtype: str | None, has_qdq: bool, trt_major: int) -> PrecisionPlan:
    """How to get ``precision`` out of this ONNX file with this TensorRT major version.

    int8 is accepted only for an explicitly quantized (Q/DQ) ONNX: that is the one INT8 path TensorRT runs
    without calibration data (implicit INT8 needs an ``IInt8Calibrator``, deprecated since 10.1, or per-tensor
    dynamic ranges, and maskpro ships neither). Quantize with NVIDIA ModelOpt first, or use fp16.
    """
    if precision not in PRECISIONS:
        raise MaskproError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if trt_major < 10:
        raise MaskproError(f"TensorRT {trt_major}.x is too old for this builder (written for the 10.x/11.x API); "
                           f"pip install {TRT_PIN}")
    onnx_dtype = onnx_dtype or "fp32"
    if precision == "int8":
        if not has_qdq:
            raise MaskproError("precision int8 needs an ONNX with QuantizeLinear/DequantizeLinear nodes (TensorRT "
                               "builds INT8 without calibration data only from explicit Q/DQ); quantize it with "
                               "NVIDIA ModelOpt first or use --precision fp16")
        return PrecisionPlan(True, (), "strongly typed: INT8 where the graph's Q/DQ nodes put it")
    if onnx_dtype == precision:
        return PrecisionPlan(True, (), f"strongly typed: the ONNX weights are already {precision}")
    if trt_major >= 11:
        raise MaskproError(f"TensorRT {trt_major} builds only strongly typed networks, so the engine would run in "
                           f"the ONNX file's {onnx_dtype}, not {precision}; export the ONNX with --dtype "
                           f"{precision} (or build with {TRT_PIN})")
    if onnx_dtype == "fp32" and precision in ("fp16", "bf16"):
        flag = precision.upper()
        return PrecisionPlan(False, (flag,), f"weakly typed fp32 graph lowered with BuilderFlag.{flag} "
                                             "(deprecated since TensorRT 10.12; export an fp16 ONNX to avoid it)")
    raise MaskproError(f"the ONNX weights are {onnx_dtype} but precision {precision} was asked; export the ONNX "
                       f"with --dtype {precision} or pass --precision {onnx_dtype}")


# ------------------------------------------------------------------------------- sparsity eligibility

_DTYPE_ALIASES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
                  "fp32": "fp32", "float32": "fp32", "float": "fp32", "tf32": "fp32", "int8": "int8",
                  "fp8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


def _dtype_name(dtype: Any) -> str:
    text = str(dtype).lower().removeprefix("torch.").removeprefix("numpy.")
    if text not in _DTYPE_ALIASES:
        raise MaskproError(f"unknown dtype {dtype!r}; use fp16, bf16, fp32 or int8")
    return _DTYPE_ALIASES[text]


def trt_sparse_eligible(out_features: int, in_features: int, dtype: Any, *,
                        compute_capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """Can TensorRT consider a structured-sparse tactic for a MatMul/FullyConnected/Conv of this shape?

    ``dtype`` is the precision the layer runs at in the engine. ``(out_features, in_features)`` is the
    weight as ``(K_out, C_in)``; the pattern runs along ``in_features``.

    TensorRT Developer Guide, "Structured Sparsity" (section 6.8 "Sparsity" in the 8.6 guide; the 10.x
    guide keeps it on the page "I/O Formats and Sparsity",
    https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/io-formats-sparsity.html):

        "the convolution kernel weights and the fully connected weights must meet the following
        requirements: For each output channel and for each spatial pixel in the kernel weights, every
        four input channels must have at least two zeros. In other words, assuming that the kernel
        weights have the shape [K, C, R, S] and C % 4 == 0 ..."
        "To enable the sparsity feature, set the kSPARSE_WEIGHTS flag in the builder config and make
        sure that kFP16 or kINT8 modes are enabled."

    The weights must be build-time constants (the builder examines them), and sparse tensor cores exist
    from sm80 (Ampere) on. Not rules, but what decides the *pick*: TensorRT times sparse against dense
    tactics and keeps the faster; NVIDIA (NVIDIA/TensorRT#3849) says sparse kernels win when C_in and
    C_out are large enough (> ~256). The 2:4 pattern itself is checked elsewhere (maskpro.export.check).
    """
    if int(out_features) < 1 or int(in_features) < 1:
        raise MaskproError(f"layer shape must be positive, got {out_features}x{in_features}")
    name = _dtype_name(dtype)
    if compute_capability is not None and tuple(compute_capability) < (8, 0):
        major, minor = compute_capability
        return False, f"sm_{major}{minor} has no sparse tensor cores (TensorRT sparse tactics need sm80+)"
    if name == "fp32":
        return False, "fp32 layers get no sparse tactics: TensorRT needs FP16 or INT8 for structured sparsity"
    if name == "fp8":
        return False, "fp8 structured-sparse tactics are not documented for TensorRT's builder"
    if in_features % 4:
        return False, f"K={in_features} is not a multiple of 4 (2:4 groups run along the input channels)"
    notes = []
    if name == "bf16":
        notes.append("bf16 is not named in TensorRT's sparsity section (FP16/INT8 are); unverified")
    if min(out_features, in_features) <= 256:
        notes.append("small layer: TensorRT may time dense as faster (sparse wins above ~256 channels)")
    return True, "eligible" + (f" ({'; '.join(notes)})" if notes else "")


# ------------------------------------------------------------------------------------- log parsing

# Wording confirmed in the TensorRT Developer Guide (8.6 section 6.8 "Sparsity") and in trtexec logs quoted
# in NVIDIA/TensorRT#1403, #2169, #4054 and pytorch/TensorRT#1340:
#   [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
#   [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
# A logger subclass receives the message without the "[I] [TRT]" prefix; both forms are matched.
_ELIGIBLE_RE = re.compile(r"Layers eligible for sparse math:(.*)$")
_PICKED_RE = re.compile(r"picked sparse implementation for layers:(.*)$")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.strip().split(", ") if n.strip()]


@dataclass
class SparsityReport:
    """What TensorRT said about sparsity at the end of one build (the last build, if the log holds several)."""

    eligible: list[str] = field(default_factory=list)  # layers whose weights TensorRT found 2:4 (fused names)
    picked: list[str] = field(default_factory=list)    # layers whose chosen tactic is a sparse one
    logged: bool = False                               # both sparsity lines were in the log

    @property
    def not_picked(self) -> list[str]:
        picked = set(self.picked)
        return [n for n in self.eligible if n not in picked]

    def to_dict(self) -> dict:
        return {"logged": self.logged, "eligible": len(self.eligible), "picked": len(self.picked),
                "eligible_layers": self.eligible, "picked_layers": self.picked, "not_picked": self.not_picked}


def parse_sparsity_log(lines: str | Iterable[str]) -> SparsityReport:
    """Read the builder's two "(Sparsity)" lines out of a TensorRT (or trtexec / trtllm-build) log."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    eligible = picked = None
    for line in lines:
        line = line.rstrip("\r\n")
        if m := _ELIGIBLE_RE.search(line):
            eligible, picked = _names(m.group(1)), None  # a new build starts a new pair
        elif m := _PICKED_RE.search(line):
            picked = _names(m.group(1))
    return SparsityReport(eligible or [], picked or [], eligible is not None and picked is not None)


@dataclass
class InspectorLayer:
    name: str
    layer_type: str | None = None
    tactic: str | None = None
    has_sparse_weights: bool | None = None  # HasSparseWeights (10.x) / AllowSparse (8.x); None: not reported
    onnx_layers: list[str] = field(default_factory=list)
    weights_type: str | None = None

    @property
    def sparse_tactic(self) -> bool:
        """Heuristic: sparse kernels carry "sparse" in their name (e.g. sm80_xmma_fprop_avdt_sparse_...)."""
        return bool(self.tactic) and "sparse" in self.tactic.lower()


_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: ([^\]]*)\]")


def parse_inspector_json(info: str | dict) -> list[InspectorLayer]:
    """Layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (= trtexec
    ``--exportLayerInfo``): ``{"Layers": [...], "Bindings": [...]}``.

    With ProfilingVerbosity.DETAILED each layer is an object (Name, LayerType, TacticName, Weights,
    HasSparseWeights, Metadata "[ONNX Layer: a]\\x1e[ONNX Layer: b]"); with LAYER_NAMES_ONLY it is a bare
    name. Layers that TensorRT compiles with its Myelin backend (LayerType "Myelin") do not list the
    kernels inside them, so their sparsity is only visible in the log.
    """
    data = json.loads(info) if isinstance(info, (str, bytes)) else info
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise MaskproError("engine information is not TensorRT inspector JSON (no \"Layers\" list); build "
                           "with profiling_verbosity detailed")
    layers = []
    for entry in data["Layers"]:
        if isinstance(entry, str):
            layers.append(InspectorLayer(entry))
            continue
        flag = entry.get("HasSparseWeights", entry.get("AllowSparse"))
        weights = entry.get("Weights") if isinstance(entry.get("Weights"), dict) else {}
        layers.append(InspectorLayer(
            name=str(entry.get("Name", "")), layer_type=entry.get("LayerType"), tactic=entry.get("TacticName"),
            has_sparse_weights=None if flag is None else bool(int(flag)),
            onnx_layers=_ONNX_LAYER_RE.findall(str(entry.get("Metadata", ""))),
            weights_type=weights.get("Type")))
    return layers


def inspector_summary(layers: list[InspectorLayer]) -> dict:
    detailed = [l for l in layers if l.layer_type is not None]
    return {"layers": len(layers), "detailed": bool(detailed),
            "with_sparse_weights": [l.name for l in layers if l.has_sparse_weights],
            "sparse_tactics": [l.name for l in layers if l.sparse_tactic],
            "myelin_layers": sum(l.layer_type == "Myelin" for l in layers)}


def match_candidates(candidates: Iterable[str], report: SparsityReport) -> dict:
    """Which ONNX MatMul nodes that hold 2:4 weights TensorRT called eligible / picked sparse for.

    TensorRT names layers after ONNX nodes and joins fused ones with " + "; a candidate missing from
    both lists was not recognised (dynamic weights, a Myelin region under another name, or a rule above).
    """
    def parts(names: list[str]) -> set[str]:
        return {p.strip() for n in names for p in n.split(" + ")}

    eligible, picked = parts(report.eligible), parts(report.picked)
    cands = list(candidates)
    return {"candidates": len(cands), "eligible": sum(c in eligible for c in cands),
            "picked": sum(c in picked for c in cands), "not_eligible": [c for c in cands if c not in eligible]}


# ------------------------------------------------------------------------------------- trtexec twin

def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, cfg: TrtBuildConfig,
                    shapes: dict[str, tuple[tuple[int, ...], ...]], plan: PrecisionPlan,
                    trt_major: int = 10) -> list[str]:
    """The ``trtexec`` line that builds the same engine as :func:`build_engine` (flags of trtexec 10.16/11.1).

    For reproducing or cross-checking a build by hand on a machine with TensorRT's binaries.
    """
    engine_path = Path(engine_path)

    def spec(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[i])}" for name, s in shapes.items())

    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--skipInference",
           f"--profilingVerbosity={cfg.profiling_verbosity}",
           f"--exportLayerInfo={engine_path.with_suffix('.layers.json')}",
           f"--builderOptimizationLevel={cfg.optimization_level}"]
    if shapes:
        cmd += [f"--minShapes={spec(0)}", f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}"]
    if plan.strongly_typed and trt_major < 11:
        cmd.append("--stronglyTyped")  # a no-op (deprecated) in 11.x, where it is the only mode
    cmd += [f"--{flag.lower()}" for flag in plan.builder_flags]
    if cfg.sparse:
        cmd.append("--sparsity=enable")
    if cfg.workspace_bytes:
        cmd.append(f"--memPoolSize=workspace:{max(1, cfg.workspace_bytes >> 20)}M")
    if cfg.timing_cache:
        cmd.append(f"--timingCacheFile={cfg.timing_cache}")
    if cfg.log_level == "verbose":
        cmd.append("--verbose")
    return cmd


# ------------------------------------------------------------------------------------ engine building

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
    threshold = int(getattr(trt.ILogger.Severity, _LOG_LEVELS[level]))

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
    from maskpro.nm import NM

    from .check import check_onnx

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
    graph = _load_onnx(onnx_path)  # the graph only; TensorRT's parser reads the weights itself
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
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, _VERBOSITY[cfg.profiling_verbosity])

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
