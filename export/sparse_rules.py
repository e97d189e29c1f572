"""Which layer shapes the sparse kernels accept: the rules the pattern check reports and the TensorRT
builder applies when it lists the layers it expects to run sparse.

Kept apart from both so that checking a model never imports an engine builder.
"""

from __future__ import annotations

from typing import Any

from maskpro.errors import MaskproError

# cuSPARSELt as PyTorch wraps it (torch.sparse.semi_structured, fp16/bf16): both dimensions of a 2:4
# layer's (out, K) weight multiples of 16.
CUSPARSELT_MULTIPLE = 16

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


def engine_rules(out_features: int, in_features: int, precision: str = "fp16") -> dict[str, str]:
    """Why each sparse engine would keep a layer of this shape dense ({} = eligible everywhere).

    ``precision`` is the engine's compute precision (fp16 by default, what sparse tensor cores run), not the
    dtype the weights happen to be stored in.
    """
    why: dict[str, str] = {}
    if out_features % CUSPARSELT_MULTIPLE or in_features % CUSPARSELT_MULTIPLE:
        why["cusparselt"] = f"cuSPARSELt needs both dimensions multiples of {CUSPARSELT_MULTIPLE}"
    ok, reason = trt_sparse_eligible(out_features, in_features, precision)
    if not ok:
        why["tensorrt"] = reason
    return why
