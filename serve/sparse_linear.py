"""The 2:4 sparse linear runtime: each targeted ``nn.Linear`` picks, per token count, the fastest measured path.

Paths: ``sparse`` (maskpro's Triton kernel on the compressed weights, :mod:`maskpro.serve.sparse24`) and
``dense`` (cuBLAS on the masked dense weight). Decode (few tokens) is memory-bound and the compressed weights
are 56% of the bytes, so the kernel wins there; prefill is compute-bound, where PyTorch's cuSPARSELt path
measured 0.13x-0.76x of dense on Hopper (see ``benchmarks/results/kernels-h100.json``), so the runtime keeps
the dense weight for it unless ``keep_dense=False`` (then the kernel serves every token count and the layer
holds only 56% of the dense bytes).

The choice is made by timing both paths for each layer shape and token bucket once (``tune``), CUDA graphs
aside, with the same inputs; on CPU every layer stays dense with the same API and outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from maskpro.nm import violations

from . import sparse24
from .sparse24 import compress_24, decompress_24  # noqa: F401 - the runtime's public kernel API

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class KernelConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    expand: int = 0     # 0: tensor-core kernel (any token count); 2: CUDA-core decode kernel (up to 16 tokens)

    def args(self) -> tuple[int, int, int, int, int]:
        return self.block_n, self.block_k, self.num_warps, self.num_stages, self.expand


CANDIDATES = ([KernelConfig(bn, bk, w, s, 2) for bn in (4, 8, 16) for bk in (128, 256, 512, 1024) for w in (2, 4)
               for s in (2, 4)]
              + [KernelConfig(bn, 256, 4, 2, 0) for bn in (16, 64)])


def candidates(n: int, k: int, tokens: int, configs: list[KernelConfig] | None = None) -> list[KernelConfig]:
    """The kernel configs that can run an (out n, in k) layer on ``tokens`` tokens."""
    return [c for c in configs or CANDIDATES
            if sparse24.kernel_ok(n, k, c.block_n, c.block_k, c.expand) and not (c.expand == 2 and tokens > 16)]


@dataclass
class ShapePlan:
    """What one (out, in) shape runs for each token bucket, with the timings that decided it."""

    choice: dict[int, str] = field(default_factory=dict)                 # bucket -> "sparse" | "dense"
    config: dict[int, KernelConfig] = field(default_factory=dict)        # bucket -> kernel config
    timings_us: dict[int, dict[str, float]] = field(default_factory=dict)


def _bucket(t: int) -> int:
    for b in TOKEN_BUCKETS:
        if t <= b:
            return b
    return TOKEN_BUCKETS[-1]


def time_us(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median time of ``fn`` in microseconds with CUDA events (each call timed on its own)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return float(torch.tensor(times).median())


def plan_shape(weight: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, buckets=TOKEN_BUCKETS,
               configs: list[KernelConfig] | None = None, keep_dense: bool = True) -> ShapePlan:
    """Time dense and every kernel config on this shape for each token bucket; keep the fastest."""
    plan = ShapePlan()
    n, k = weight.shape
    for t in buckets:
        x = torch.randn(t, k, dtype=weight.dtype, device=weight.device)
        timings = {"dense": time_us(lambda: torch.nn.functional.linear(x, weight))} if keep_dense else {}
        best = None
        for cfg in candidates(n, k, t, configs):
            try:
                us = time_us(lambda: sparse24.sparse24_mm(x, values, meta, *cfg.args()))
            except Exception as e:  # noqa: BLE001 - a config this Triton build cannot compile is skipped
                log.debug("kernel config %s failed: %s", cfg, e)
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        if best is not None:
            timings["sparse"] = best[0]
            plan.config[t] = best[1]
        plan.timings_us[t] = timings
        plan.choice[t] = min(timings, key=timings.get)
    return plan


# The kernel config per token bucket that the decode kernel measured best on H100 (kernels-h100.json); used
# where a layer has no measured plan (the vLLM plugin, whose CUDA-graph capture forbids timing).
DEFAULT_DECODE = KernelConfig(4, 1024, 2, 4, 2)


def sparse_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for a compressed 2:4 ``W`` with no timing: the decode kernel for up to 16 tokens
    when the shape allows it, else the dense product of the decompressed weight (what prefill wants)."""
    x2 = x.reshape(-1, in_features)
    cfg = DEFAULT_DECODE
    if x2.device.type == "cuda" and x2.shape[0] <= 16 and sparse24.kernel_ok(out_features, in_features,
                                                                               cfg.block_n, cfg.block_k, cfg.expand):
        y = sparse24.sparse24_mm(x2.contiguous(), values, meta, *cfg.args())
    else:
        y = x2 @ decompress_24(values, meta).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """A 2:4 linear layer: compressed weights for the kernel, and the dense weight where dense is faster."""

    def __init__(self, linear: nn.Linear, plan: ShapePlan | None = None, keep_dense: bool = True,
                 compressed: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, meta = compressed if compressed is not None else compress_24(linear.weight.data)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("meta", meta, persistent=False)
        self.weight = linear.weight if keep_dense else None
        self.bias = linear.bias
        self.plan = plan or ShapePlan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        b = _bucket(x2.shape[0])
        if self.weight is not None and (self.plan.choice.get(b, "dense") == "dense" or x2.device.type != "cuda"):
            y = torch.nn.functional.linear(x2, self.weight)
        else:
            cfg = self.plan.config.get(b, KernelConfig())
            y = sparse24.sparse24_mm(x2.contiguous(), self.values, self.meta, *cfg.args())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, dense={'kept' if self.weight is not None else 'dropped'}"


def sparsify(model: nn.Module, targets: list[str] | None = None, *, keep_dense: bool = True, tune: bool = True,
             buckets=TOKEN_BUCKETS) -> dict:
    """Swap the targeted 2:4 linears of ``model`` for :class:`SparseLinear`; returns a report.

    ``targets`` defaults to the layers in the checkpoint's ``maskpro.json`` when the model was loaded from one
    (``model.config._name_or_path``), else every linear whose weight is 2:4. On CPU nothing is swapped.
    """
    device = next(model.parameters()).device
    if device.type != "cuda" or sparse24.triton is None:
        why = "no CUDA device" if device.type != "cuda" else "Triton is not installed"
        return {"backend": "dense", "reason": f"{why}: dense masked weights (same outputs)", "layers": 0}
    if targets is None:
        targets = _targets_from_checkpoint(model)
    modules = dict(model.named_modules())
    plans: dict[tuple[int, int], ShapePlan] = {}
    swapped = []
    for name in targets or [n for n, m in modules.items() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear) or lin.in_features % 8:
            continue
        w = lin.weight.data
        if violations(w, sparse24.NM24).numel():
            continue  # not 2:4: stays dense
        values, meta = compress_24(w)
        key = tuple(w.shape)
        if tune and key not in plans:
            plans[key] = plan_shape(w, values, meta, buckets, keep_dense=keep_dense)
            log.info("plan %s: %s", key, plans[key].choice)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child,
                SparseLinear(lin, plans.get(key), keep_dense=keep_dense, compressed=(values, meta)))
        swapped.append(name)
    return {"backend": "sparse24-triton", "layers": len(swapped), "keep_dense": keep_dense,
            "plans": {f"{k[1]}x{k[0]}": {"choice": p.choice, "timings_us": p.timings_us} for k, p in plans.items()}}


def _targets_from_checkpoint(model: nn.Module) -> list[str] | None:
    from pathlib import Path

    from maskpro.artifacts import METADATA, read_metadata

    path = Path(getattr(model.config, "_name_or_path", "") or ".")
    return read_metadata(path)["targets"] if (path / METADATA).is_file() else None
