"""What a TensorRT engine build asks for, decided before TensorRT is imported: the build settings, the
optimization profile read from the ONNX inputs, the typing and builder flags that give the asked precision
with this TensorRT major version, and the equivalent ``trtexec`` command line.

The 10.x/11.x API differences these follow are listed in :mod:`.tensorrt`. Everything here runs without
TensorRT or a GPU, so a bad setting or an ONNX without usable shapes fails before the build is attempted.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from maskpro.errors import MaskproError

# The version the install hint names: the newest 10.x, whose sources this module was read against and
# whose weakly typed FP16 flag lets an fp32 ONNX build an fp16 engine. 11.x works too with an fp16 ONNX.
TRT_PIN = "tensorrt==10.16.1.11"
PRECISIONS = ("fp16", "bf16", "fp32", "int8")
# Option value -> the TensorRT enum member it names (ProfilingVerbosity, ILogger.Severity).
PROFILING_VERBOSITY = {"detailed": "DETAILED", "layer_names_only": "LAYER_NAMES_ONLY", "none": "NONE"}
LOG_LEVELS = {"error": "ERROR", "warning": "WARNING", "info": "INFO", "verbose": "VERBOSE"}


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
        if self.profiling_verbosity not in PROFILING_VERBOSITY:
            raise MaskproError(f"profiling_verbosity must be one of {', '.join(PROFILING_VERBOSITY)}")
        if self.log_level not in LOG_LEVELS:
            raise MaskproError(f"log_level must be one of {', '.join(LOG_LEVELS)}")

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


def load_onnx_graph(onnx_model_or_path: Any, load_data: bool = False):
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
    model = load_onnx_graph(onnx_model_or_path)
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
    for t in load_onnx_graph(onnx_model_or_path).graph.initializer:
        if t.data_type in names:
            counts[names[t.data_type]] = counts.get(names[t.data_type], 0) + math.prod(t.dims)
    return max(counts, key=counts.get) if counts else None


def onnx_has_qdq(onnx_model_or_path: Any) -> bool:
    """True when the graph is explicitly quantized (QuantizeLinear / DequantizeLinear nodes)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for n in load_onnx_graph(onnx_model_or_path).graph.node)


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
