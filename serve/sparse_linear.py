"""The 2:4 sparse linear runtime: each targeted ``nn.Linear`` picks, per token count, the fastest measured path.

Paths: ``mma`` (maskpro's ``mma.sp`` tensor-core kernel on fragment-ordered compressed weights,
:mod:`maskpro.serve.sparse_mma`), ``sparse`` (maskpro's Triton kernels on the compressed weights,
:mod:`maskpro.serve.sparse24`), ``semi`` (cuSPARSELt through ``torch._cslt_sparse_mm``,
:func:`cusparselt_linear`) and ``dense`` (cuBLAS on the masked dense weight). Decode (few tokens) is
memory-bound and the compressed weights are 56% of the bytes, so a 2:4 kernel wins at 1-16 tokens (mma.sp, or
the Triton word kernel at 1 token). Prefill is compute-bound: cuSPARSELt's sparse tensor cores are faster only
with a column-major result, which slows every op after it, so with a row-major result dense wins nearly
everywhere (``benchmarks/results/kernels-h100.json``). With ``keep_dense=False`` the layer holds only
compressed weights and the 2:4 kernels serve every token count.

The choice is made by timing every path for each layer shape and token bucket once, with the same inputs;
on CPU every layer stays dense with the same API and outputs.
"""

from __future__ import annotations

import bisect
import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from maskpro.nm import violations

from . import shared_input, sparse24, sparse_mma
from .sparse24 import compress_24, decompress_24  # noqa: F401 - the runtime's public kernel API
from .sparse_mma import MmaConfig

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class KernelConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    expand: int = 0     # 0: tensor-core kernel (any token count); 2: CUDA-core decode kernel (up to 16 tokens);
                        # 3: the decode kernel reading each group's two values as one 32-bit word

    def args(self) -> tuple[int, int, int, int, int]:
        return self.block_n, self.block_k, self.num_warps, self.num_stages, self.expand


# Configs worth timing, pruned to the Triton configs that came out best for some shape and token count on an
# H100 (docs/kernels.md): each config is one Triton compile per token tile, so the list stays short.
CANDIDATES = ([KernelConfig(bn, bk, w, 4, 3) for bn in (4, 8) for bk in (256, 1024) for w in (2, 4)]
              + [KernelConfig(bn, bk, w, 4, 2) for bn in (4, 8, 16) for bk in (256, 1024) for w in (2, 4)]
              + [KernelConfig(8, 512, 2, 2, 2)]
              + [KernelConfig(bn, 256, 4, 2, 0) for bn in (16, 64)])


def candidates(n: int, k: int, tokens: int, configs: list[KernelConfig] | None = None) -> list[KernelConfig]:
    """The kernel configs that can run an (out n, in k) layer on ``tokens`` tokens."""
    return [c for c in configs or CANDIDATES
            if sparse24.kernel_ok(n, k, c.block_n, c.block_k, c.expand) and not (c.expand == 2 and tokens > 16)
            and not (c.expand == 3 and tokens > 2)]  # the word kernel wins at 1 token; wider tiles spill


@dataclass
class ShapePlan:
    """What one (out, in) shape runs for each token bucket, with the timings that decided it."""

    choice: dict[int, str] = field(default_factory=dict)          # bucket -> "mma" | "sparse" | "semi" | "dense"
    config: dict[int, KernelConfig | MmaConfig] = field(default_factory=dict)  # bucket -> kernel config
    timings_us: dict[int, dict[str, float]] = field(default_factory=dict)


def token_bucket(t: int) -> int:
    return TOKEN_BUCKETS[min(bisect.bisect_left(TOKEN_BUCKETS, t), len(TOKEN_BUCKETS) - 1)]


def l2_flush_buffer() -> torch.Tensor:
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 50 * 2**20
    return torch.empty(2 * l2, dtype=torch.int8, device="cuda")


def time_us(fn, iters: int = 30, warmup: int = 5, flush: torch.Tensor | None = None,
            device_only: bool = False) -> float:
    """Median time of ``fn`` in microseconds with CUDA events, each call with a cold L2 cache.

    In a model every layer's weights stream from DRAM (hundreds of layers do not fit in L2), so a layer is
    timed after overwriting twice the L2 size; timing it warm would favour whichever path fits in L2.
    ``flush`` is that scratch buffer, passed in when many timings share it. ``device_only`` keeps the GPU
    busy while the host enqueues the call, so launch overhead on the host is not counted: the cost inside a
    CUDA graph (decode steps; prefill where it is captured). Eager timing charges each path its host overhead,
    which an eager caller pays. Paths are not timed from a CUDA graph each: that many captures slow the host
    side of every later eager prefill (docs/kernels.md). Only cuSPARSELt in graph buckets is timed from a graph
    (``graph_time_us``), as its eager call waits on the GPU.
    """
    flush = l2_flush_buffer() if flush is None else flush
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if device_only:
            torch.cuda._sleep(HOST_HIDING_CYCLES)
        flush.zero_()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return float(torch.tensor(times).median())


def graph_time_us(fn, iters: int = 30, flush: torch.Tensor | None = None) -> float:
    """Median device time of ``fn`` replayed from a CUDA graph of one call, each replay with a cold L2.

    For paths whose eager call waits on the GPU (cuSPARSELt builds a plan and workspace per call), which no
    host-hiding spin can keep out of an eager timing; inside a captured step they cost only their kernels.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return time_us(graph.replay, iters=iters, warmup=2, flush=flush, device_only=True)
    finally:
        del graph


HOST_HIDING_CYCLES = 2_000_000  # about 1 ms of GPU spin (H100 clocks): longer than a kernel's host-side launch


def semi_structured(weight: torch.Tensor) -> torch.Tensor | None:
    """cuSPARSELt's compressed copy of ``weight`` (for :func:`cusparselt_linear`), or None where this GPU, build
    or shape has none. Only for prefill sizes, where it rarely beats dense (docs/kernels.md)."""
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        return torch._cslt_compress(weight)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError) as e:  # no cuSPARSELt here
        log.warning("no cuSPARSELt 2:4 for shape %s (prefill stays dense): %s", tuple(weight.shape), e)
        return None


CSLT_TOKEN_MULTIPLE = 8  # cuSPARSELt's fp16/bf16 dense operand needs a multiple of 8 columns (tokens here)


def cusparselt_linear(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ W.T + bias`` ([tokens, out], row-major) with cuSPARSELt on ``packed`` (:func:`semi_structured`).

    cuSPARSELt computes ``W @ x2.T`` ([out, tokens]); its transposed view is what PyTorch's semi-structured
    tensor returns, column-major, and every op after it then runs on strided memory, which costs a model's
    prefill more than the faster products save. cuSPARSELt's transposed (row-major) result is slower than dense
    (docs/kernels.md, "Why prefill stays dense"), so the product is copied to row-major instead: one strided
    pass over the output, which costs about what the sparse tensor cores save. The token count is padded to
    what cuSPARSELt accepts: an unpadded count it rejects can leave the CUDA context unusable
    (docs/kernels.md).
    """
    x2 = x2.contiguous()
    tokens = x2.shape[0]
    pad = -tokens % CSLT_TOKEN_MULTIPLE
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    y = torch._cslt_sparse_mm(packed, x2.t(), bias=bias).t()  # [tokens, out], column-major
    return (y[:tokens] if pad else y).contiguous()


def plan_shape(weight: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, buckets=TOKEN_BUCKETS,
               configs: list[KernelConfig] | None = None, keep_dense: bool = True,
               semi: torch.Tensor | None = None, mma: tuple[torch.Tensor, torch.Tensor] | None = None,
               graph_buckets=()) -> ShapePlan:
    """Time dense, cuSPARSELt (``semi``), the mma.sp kernel (``mma``: its layout) and every Triton config for
    each token bucket; keep the fastest. Buckets in ``graph_buckets`` run inside CUDA graphs (a captured
    decode step or prefill) and are timed on the device alone (cuSPARSELt there from a graph of one call, as its
    eager call waits on the GPU); the others eagerly, host overhead included."""
    plan = ShapePlan()
    n, k = weight.shape
    flush = l2_flush_buffer()
    for t in buckets:
        x = torch.randn(t, k, dtype=weight.dtype, device=weight.device)
        timer = functools.partial(time_us, device_only=t in graph_buckets)
        timings = {"dense": timer(lambda: torch.nn.functional.linear(x, weight), flush=flush)} if keep_dense else {}
        if semi is not None and t > sparse_mma.MAX_TOKENS:  # never wins at decode sizes
            try:
                semi_timer = graph_time_us if t in graph_buckets else timer
                timings["semi"] = semi_timer(lambda: cusparselt_linear(x, semi), flush=flush)
            except RuntimeError as e:  # e.g. a token count the library rejects
                log.warning("cuSPARSELt 2:4 failed at %d tokens (not a candidate there): %s", t, e)
        best = None
        for cfg in candidates(n, k, t, configs):
            try:
                us = timer(lambda: sparse24.sparse24_mm(x, values, meta, *cfg.args()), flush=flush)
            except Exception as e:  # noqa: BLE001 - a config this Triton build cannot compile is skipped
                log.debug("kernel config %s failed: %s", cfg, e)
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        if best is not None:
            timings["sparse"] = best[0]
        best_mma = None
        for cfg in sparse_mma.candidates(n, k, t) if mma is not None else []:
            try:
                us = timer(lambda: sparse_mma.sparse_mma_mm(x, *mma, n, cfg), flush=flush)
            except RuntimeError as e:  # e.g. NVRTC missing from this build: the other paths remain
                log.warning("mma.sp kernel %s failed at %d tokens (not a candidate there): %s", cfg, t, e)
                break
            if best_mma is None or us < best_mma[0]:
                best_mma = (us, cfg)
        if best_mma is not None:
            timings["mma"] = best_mma[0]
        plan.timings_us[t] = timings
        plan.choice[t] = min(timings, key=timings.get)
        # elsewhere the Triton config is the fallback where the dense weight is dropped
        pick = best_mma if plan.choice[t] == "mma" else best
        if pick is not None:
            plan.config[t] = pick[1]
    return plan


# The kernel config per token bucket that the decode kernel measured best on H100 (kernels-h100.json); used
# where a layer has no measured plan (the vLLM plugin, whose CUDA-graph capture forbids timing).
DEFAULT_DECODE = KernelConfig(4, 1024, 2, 4, 2)
DEFAULT_SINGLE = KernelConfig(4, 1024, 4, 4, 3)  # 1-2 tokens: the word kernel, faster than dense there


def sparse_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for a compressed 2:4 ``W`` with no timing: the decode kernel for up to 16 tokens
    when the shape allows it, else the dense product of the decompressed weight (what prefill wants)."""
    x2 = x.reshape(-1, in_features)
    cfg = DEFAULT_SINGLE if x2.shape[0] <= 2 else DEFAULT_DECODE
    if x2.device.type == "cuda" and x2.shape[0] <= 16 and sparse24.kernel_ok(out_features, in_features,
                                                                               cfg.block_n, cfg.block_k, cfg.expand):
        y = sparse24.sparse24_mm(x2.contiguous(), values, meta, *cfg.args())
    else:
        y = x2 @ decompress_24(values, meta).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


DECODE_TOKENS = 16  # up to here the mma.sp kernel beats dense cuBLAS on Llama-2-7B shapes (docs/kernels.md)


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sparse_linear_mma(x: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int, in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for a 2:4 ``W`` stored only in the ``mma.sp`` fragment order, with no timing: the
    ``mma.sp`` kernel for up to ``DECODE_TOKENS`` tokens on a GPU that has it, the ``mma.sp`` GEMM's default
    medium-batch config up to ``sparse_mma.MAX_TOKENS``, else the dense product of the weight expanded into the
    device's shared scratch buffer (prefill, CPU): no allocation, so every token count can be captured in a
    CUDA graph once ``sparse_ops.reserve_layer`` has run."""
    from . import sparse_gemm
    from .sparse_ops import expanded_mm

    x2 = x.reshape(-1, in_features)
    t = x2.shape[0]
    cuda = x2.device.type == "cuda" and sparse_mma.available()
    medium = (sparse_gemm.medium_default(out_features, in_features, t, _sms(x2.device))
              if cuda and DECODE_TOKENS < t <= sparse_mma.MAX_TOKENS else None)
    if cuda and t <= DECODE_TOKENS:
        y = sparse_mma.sparse_mma_mm(x2, tiles, positions, out_features, sparse_mma.DEFAULT_CONFIG)
    elif medium is not None:
        y = sparse_gemm.sparse_gemm(x2, tiles, positions, out_features, medium)
    else:
        y = expanded_mm(x2, tiles, positions, out_features)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """A 2:4 linear layer: compressed weights for the kernel, and the dense weight where dense is faster."""

    def __init__(self, linear: nn.Linear, plan: ShapePlan | None = None, keep_dense: bool = True,
                 compressed: tuple[torch.Tensor, torch.Tensor] | None = None, semi: torch.Tensor | None = None,
                 mma: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.semi = semi  # cuSPARSELt's compressed weight, kept only where the plan picks it (prefill)
        self.mma = mma    # the mma.sp kernel's (tiles, positions), kept only where the plan picks it (decode)
        if mma is not None:
            sparse_mma.reserve(linear.out_features, mma[0].device)  # before any CUDA-graph capture
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plan = plan or ShapePlan()
        values, meta = compressed if compressed is not None else compress_24(linear.weight.data)
        if keep_dense and plan is not None and "sparse" not in plan.choice.values():
            values = meta = None  # the Triton kernel's copy is needed only where it is picked (or no dense)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("meta", meta, persistent=False)
        self.weight = linear.weight if keep_dense else None
        self.has_dense = keep_dense  # a plain attribute: read per call, where a parameter lookup costs more
        self.bias = linear.bias
        self.dense_only = False  # A/B timing: run the kept dense weight for every token count

    def _choice(self, x: torch.Tensor, b: int) -> str:
        """The planned path for bucket ``b`` (dense off CUDA and in dense-only mode)."""
        return (self.plan.choice.get(b, "dense") if x.device.type == "cuda" and not
                (self.dense_only and self.has_dense) else "dense")

    def runs_dense_rows(self, x: torch.Tensor) -> bool:
        """Whether the members of a fused group should each run their own rows of the dense weight on ``x``.

        Yes at prefill sizes (past the decode kernel's token range) where this layer would run its dense weight
        anyway: there the fused q/k/v and gate/up dense products are slower than separate ones (docs/kernels.md),
        while at decode fusing them is the gain.
        Called for every member on every prefill, so it reads plain attributes only.
        """
        tokens = x.numel() // x.shape[-1]
        return tokens > sparse_mma.MAX_TOKENS and self.has_dense and self._choice(x, token_bucket(tokens)) == "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = token_bucket(x.numel() // x.shape[-1])
        choice = self._choice(x, b)
        if choice == "dense" and self.has_dense:  # the common prefill case, with as little host work as nn.Linear
            return torch.nn.functional.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if choice == "semi" and self.semi is not None:  # the bias is added inside cuSPARSELt's epilogue
            return cusparselt_linear(x2, self.semi, self.bias).reshape(*shape[:-1], self.out_features)
        if choice == "mma" and self.mma is not None:  # planned only for buckets of up to MAX_TOKENS
            y = sparse_mma.sparse_mma_mm(x2, *self.mma, self.out_features, self.plan.config[b])
        elif self.weight is not None and choice != "sparse":
            y = torch.nn.functional.linear(x2, self.weight)
        else:
            cfg = self.plan.config.get(b, KernelConfig())
            cfg = cfg if isinstance(cfg, KernelConfig) else KernelConfig()
            y = sparse24.sparse24_mm(x2.contiguous(), self.values, self.meta, *cfg.args())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4, "
                f"dense={'kept' if self.weight is not None else 'dropped'}, cusparselt={self.semi is not None}, "
                f"mma={self.mma is not None}")


def sparsify(model: nn.Module, targets: list[str] | None = None, *, keep_dense: bool = True, tune: bool = True,
             buckets=TOKEN_BUCKETS, cusparselt: bool = True, graph_buckets=(), fuse: bool = True) -> dict:
    """Swap the targeted 2:4 linears of ``model`` for :class:`SparseLinear`; returns a report.

    ``targets`` defaults to the layers in the checkpoint's ``maskpro.json`` when the model was loaded from one
    (``model.config._name_or_path``), else every linear whose weight is 2:4. On CPU nothing is swapped.
    ``graph_buckets``: the token buckets the caller runs inside CUDA graphs, planned by device time alone.
    ``fuse``: q/k/v and gate/up run as one product each (:mod:`maskpro.serve.shared_input`).
    """
    device = next(model.parameters()).device
    if device.type != "cuda" or sparse24.triton is None:
        why = "no CUDA device" if device.type != "cuda" else "Triton is not installed"
        return {"backend": "dense", "reason": f"{why}: dense masked weights (same outputs)", "layers": 0}
    if targets is None:
        targets = _targets_from_checkpoint(model)
    semi_ok = cusparselt and keep_dense  # without the dense weight the layer keeps only the compressed bytes
    mma_here = tune and sparse_mma.available()  # without a plan the kernel is never picked
    modules = dict(model.named_modules())
    plans: dict[tuple[int, int], ShapePlan] = {}

    def sparse_module(lin: nn.Linear) -> SparseLinear:
        w = lin.weight.data
        values, meta = compress_24(w)
        key = tuple(w.shape)
        semi = None
        # the fragment-ordered copy is built only where the mma.sp kernel can run and its plan may pick it
        mma = (sparse_mma.mma_layout(values, meta) if mma_here and sparse_mma.mma_ok(*key)
               and (key not in plans or "mma" in plans[key].choice.values()) else None)
        if tune and key not in plans:
            semi = semi_structured(w) if semi_ok else None
            plans[key] = plan_shape(w, values, meta, buckets, keep_dense=keep_dense, semi=semi, mma=mma,
                                    graph_buckets=graph_buckets)
            log.info("plan %s: %s", key, plans[key].choice)
        if key in plans and "mma" not in plans[key].choice.values():
            mma = None  # held only where the mma.sp kernel is the fastest path
        # cuSPARSELt's copy of the weights is held only where it is the fastest path for some bucket.
        if not (semi_ok and key in plans and "semi" in plans[key].choice.values()):
            semi = None
        elif semi is None:  # a later layer of an already planned shape
            semi = semi_structured(w)
        return SparseLinear(lin, plans.get(key), keep_dense=keep_dense, compressed=(values, meta), semi=semi,
                            mma=mma)

    def is_24(m: nn.Module) -> bool:
        return (isinstance(m, nn.Linear) and m.in_features % 8 == 0
                and not violations(m.weight.data, sparse24.NM24).numel())  # others stay dense

    prefused = shared_input.fused_products(model)  # groups fused before (a dense model timed fused)
    inside = {id(f) for f, _ in prefused.values()}
    names = [n for n in targets or [n for n, m in modules.items()
                                    if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
             if n in modules and id(modules[n]) not in inside and is_24(modules[n])]
    groups = shared_input.fusable_groups(model, set(names)) if fuse else []
    grouped = {n for g in groups for n in g}
    for group in groups:
        for n in group:
            del modules[n]  # drop the last reference to each original weight once it is fused
        shared_input.fuse(model, group)
    for fused, members in shared_input.fused_products(model).values():
        if is_24(fused):
            sparse = sparse_module(fused)
            for member in members:
                member.fused = sparse
    for name in names:
        if name not in grouped:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, sparse_module(modules[name]))
    sparse_layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    fused = [ms for f, ms in shared_input.fused_products(model).values() if isinstance(f, SparseLinear)]
    return {"backend": "sparse24-triton", "layers": len(set(names) - grouped) + sum(map(len, fused)),
            "fused_groups": len(fused),
            "keep_dense": keep_dense, "cusparselt_layers": sum(m.semi is not None for m in sparse_layers),
            "mma_layers": sum(m.mma is not None for m in sparse_layers),
            "plans": {f"{k[1]}x{k[0]}": {"choice": p.choice, "timings_us": p.timings_us} for k, p in plans.items()}}


def set_dense_only(model: nn.Module, on: bool = True) -> int:
    """Make every :class:`SparseLinear` of ``model`` that kept its dense weight run it (``on``) or its plan
    again; returns how many layers. For timing dense against 2:4 in the same model, in either order."""
    layers = [m for m in model.modules() if isinstance(m, SparseLinear) and m.weight is not None]
    for m in layers:
        m.dense_only = on
    return len(layers)


def _targets_from_checkpoint(model: nn.Module) -> list[str] | None:
    from pathlib import Path

    from maskpro.schema import has_meta, read_meta

    source = getattr(getattr(model, "config", None), "_name_or_path", "")  # plain torch modules have no config
    if not source:
        return None  # every 2:4 linear is a target
    path = Path(source)
    return list(read_meta(path).targets) if has_meta(path) else None
