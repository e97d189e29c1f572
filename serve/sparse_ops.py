"""The 2:4 product as a ``torch.library`` custom op, so a whole decode step compiles and replays from a graph.

``maskpro::sp24_mm(x, tiles, positions, out_features, config)`` computes ``x @ W.T`` for a weight held only
in the ``mma.sp`` fragment order (:func:`maskpro.serve.sparse_mma.mma_layout`): 56% of the dense bytes and
no dense copy. Up to ``sparse_mma.MAX_TOKENS`` tokens it runs the ``mma.sp`` kernel with ``config``; past
that (prefill, compute-bound) it expands the weight into one scratch buffer shared by every layer of the
device and multiplies with cuBLAS, so a model never holds more than one layer's dense weight. The op has a
fake (meta) implementation, so ``torch.compile`` traces through it without a graph break, and it never copies
between host and device, so every token count can be captured in a CUDA graph.

On CPU (and GPUs without sparse tensor cores) the same op expands with torch and multiplies densely.
"""

from __future__ import annotations

import torch

from . import sparse_gemm, sparse_mma
from .sparse24 import decompress_24

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the torch expansion
    triton = None


if triton is not None:
    @triton.jit
    def _expand_kernel(tiles_ptr, pos_ptr, out_ptr, K, KT, KG):
        """One 16x128 block of the dense weight from its fragment-ordered tiles and position words.

        Inverts ``mma_layout``: row ``16 tr + 8 h + g``, group ``j`` of k tile ``kt`` sits in lane
        ``4 g + t`` (``t = 2 (j % 2) + j // 4``), slot ``2 s + h`` (``s = (j % 4) // 2``) of its tile; its
        positions sit in nibble ``q % 4`` (``q = 2 (j % 4) + j // 4``) of half ``h`` of word ``ktl`` of lane
        ``2 g + q // 4`` of the tile row's k group.
        """
        tr = tl.program_id(0)
        kg = tl.program_id(1)
        r = tl.arange(0, 16)
        grp = tl.arange(0, 32)                      # the 32 groups of 4 in this 128-wide k group
        h = (r // 8)[:, None]
        g = (r % 8)[:, None]
        ktl = (grp // 8)[None, :]
        j = (grp % 8)[None, :]
        t = (j % 2) * 2 + j // 4
        s = (j % 4) // 2
        pair = tl.load(tiles_ptr + (((tr * KT + kg * 4 + ktl) * 32 + g * 4 + t) * 4 + s * 2 + h))
        q = (j % 4) * 2 + j // 4
        word = tl.load(pos_ptr + (((tr * KG + kg) * 16 + g * 2 + q // 4) * 4 + ktl))
        nib = (word >> ((q % 4) * 4 + h * 16)) & 15
        i0 = nib & 3
        i1 = nib >> 2
        ty = out_ptr.dtype.element_ty
        v0 = (pair & 0xFFFF).to(tl.int16).to(ty, bitcast=True)
        v1 = ((pair >> 16) & 0xFFFF).to(tl.int16).to(ty, bitcast=True)
        zero = tl.zeros_like(v0)
        w0 = tl.where(i0 == 0, v0, zero)
        w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        w3 = tl.where(i1 == 3, v1, zero)
        dense = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (16, 128))   # positions 0-3 in order
        cols = kg * 128 + tl.arange(0, 128)
        tl.store(out_ptr + (tr * 16 + r)[:, None].to(tl.int64) * K + cols[None, :], dense)


def expand_into(out: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Write the dense (N, K) weight of fragment-ordered ``tiles``/``positions`` into ``out`` (N, K); returns it."""
    n, k = out.shape
    if out.device.type == "cuda" and triton is not None:
        _expand_kernel[(n // 16, k // 128)](tiles, positions, out, k, k // 32, k // 128, num_warps=4)
    else:
        out.copy_(decompress_24(*sparse_mma.mma_unlayout(tiles, positions, out.dtype)))
    return out


_SCRATCH: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}


def reserve_scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The shared expansion buffer of ``device`` (at least ``numel`` elements): one layer's dense weight at a
    time, reused by every layer, so prefill holds one dense layer, never a dense model. Reserve it before any
    graph capture: growing it inside a capture would allocate from the graph's pool."""
    key = (device.type, device.index or 0, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def reserve_layer(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate what a layer's products need on ``device`` (the decode kernel's split-K scratch, the shared
    expansion buffer) before any CUDA graph is captured."""
    if device.type == "cuda":
        sparse_mma.reserve(out_features, device)
        reserve_scratch(out_features * in_features, device, dtype)


def expanded_mm(x: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x`` [T, K] @ W.T with W expanded into the device's shared scratch buffer: one kernel, no allocation."""
    n = out_features * x.shape[1]
    w = reserve_scratch(n, x.device, x.dtype)[:n].view(out_features, x.shape[1])
    return torch.mm(x, expand_into(w, tiles, positions).t())


@torch.library.custom_op("maskpro::sp24_mm", mutates_args=())
def sp24_mm(x: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor, out_features: int,
            decode: list[int], gemm: list[int]) -> torch.Tensor:
    """``x`` [T, K] @ W.T for W in fragment order: the ``mma.sp`` decode kernel with config ``decode`` (the
    :class:`~sparse_mma.MmaConfig` fields; empty: not used) up to ``MAX_TOKENS`` tokens, else the ``mma.sp``
    GEMM with config ``gemm`` (:class:`~sparse_gemm.GemmConfig`; empty: not used), else the expanded weight."""
    t = x.shape[0]
    if x.device.type == "cuda" and sparse_mma.available():
        if decode and t <= sparse_mma.MAX_TOKENS:
            return sparse_mma.sparse_mma_mm(x, tiles, positions, out_features, sparse_mma.MmaConfig(*decode))
        if gemm:
            return sparse_gemm.sparse_gemm(x, tiles, positions, out_features, sparse_gemm.GemmConfig(*gemm))
    return expanded_mm(x, tiles, positions, out_features)


@sp24_mm.register_fake
def _(x, tiles, positions, out_features, decode, gemm):
    return x.new_empty((x.shape[0], out_features))


PREFILL_PLAN_TOKENS = 512  # the prefill size the GEMM config (or expansion) is chosen at
MEDIUM_TOKENS = 16  # from here on decode buckets also time the GEMM's medium-batch configs


def plan(layer: Weight24, buckets, iters: int = 15) -> dict:
    """Time every path of ``layer``'s shape on the device alone (cold L2, as inside a CUDA graph): for each
    decode bucket the ``mma.sp`` decode configs, the GEMM configs and expansion; for prefill the GEMM configs
    and expansion. A GEMM config is a candidate only where it matches expansion's result. Sets
    ``layer.choice`` and ``layer.prefill``; returns the timings (us) and choices."""
    from dataclasses import astuple

    from .sparse_linear import l2_flush_buffer, time_us

    n, k = layer.out_features, layer.in_features
    flush, report = l2_flush_buffer(), {}
    scratch = torch.empty(n, k, dtype=layer.dtype, device=layer.tiles.device)

    def timed(fn) -> float:
        return time_us(fn, iters=iters, flush=flush, device_only=True)

    def gemms(x: torch.Tensor, configs) -> dict:
        ref = x.float() @ expand_into(scratch, layer.tiles, layer.positions).float().t()
        out = {}
        for cfg in configs if sparse_mma.available() else []:
            if not sparse_gemm.gemm_ok(n, k, cfg):
                continue
            try:
                y = sparse_gemm.sparse_gemm(x, layer.tiles, layer.positions, n, cfg)
                if float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)) > 1e-2:
                    continue
                out[cfg] = timed(lambda: sparse_gemm.sparse_gemm(x, layer.tiles, layer.positions, n, cfg))
            except RuntimeError:  # a config this GPU or build cannot run is no candidate
                continue
        return out

    for t, prefill in [(t, False) for t in sorted(set(buckets))] + [(PREFILL_PLAN_TOKENS, True)]:
        x = torch.randn(t, k, dtype=layer.dtype, device=layer.tiles.device)
        options: dict[tuple, float] = {("expand", None): timed(
            lambda: torch.mm(x, expand_into(scratch, layer.tiles, layer.positions).t()))}
        if prefill:
            options.update({("gemm", c): us for c, us in gemms(x, sparse_gemm.GEMM_CANDIDATES).items()})
        elif MEDIUM_TOKENS <= t <= sparse_mma.MAX_TOKENS:  # medium batches: rows share staged inputs, K split
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            options.update({("gemm", c): us for c, us in gemms(x, sparse_gemm.medium_candidates(n, k, t, sms)).items()})
        if t <= sparse_mma.MAX_TOKENS and not prefill:
            options.update({("mma", c): timed(lambda: sparse_mma.sparse_mma_mm(x, layer.tiles, layer.positions, n, c))
                            for c in sparse_mma.candidates(n, k, t)})
        best = min(options, key=options.get)
        if prefill:
            layer.prefill = best[1]
        else:
            layer.choice[t] = best
        key = "prefill" if prefill else t
        report[key] = {"choice": best[0], "config": list(astuple(best[1])) if best[1] else [],
                       "us": options[best], "expand_us": options[("expand", None)],
                       "best_gemm_us": min((v for (kind, _), v in options.items() if kind == "gemm"), default=None),
                       "best_mma_us": min((v for (kind, _), v in options.items() if kind == "mma"), default=None)}
    return report


class Weight24(torch.nn.Module):
    """A 2:4 linear layer that holds only the fragment-ordered compressed weight (and its bias).

    ``choice`` maps a decode token bucket to the path measured best there (:func:`plan`): ("mma", MmaConfig),
    ("gemm", GemmConfig) or ("expand", None); ``prefill`` is the GEMM config for longer inputs (None: expand).
    Unplanned, decode runs the ``mma.sp`` kernel's default config and prefill expands. The path is picked when
    a step is traced, as the token count of a compiled or captured step is fixed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        from .sparse24 import compress_24

        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        tiles, positions = sparse_mma.mma_layout(*compress_24(weight))
        self.register_buffer("tiles", tiles)
        self.register_buffer("positions", positions)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.choice: dict[int, tuple] = {}
        self.prefill: sparse_gemm.GemmConfig | None = None
        reserve_layer(self.out_features, self.in_features, weight.dtype, tiles.device)

    def args_for(self, tokens: int) -> tuple[list[int], list[int]]:
        """The op's (decode, gemm) configs for steps of ``tokens`` tokens."""
        from dataclasses import astuple

        fits = [b for b in self.choice if b >= tokens]
        kind, cfg = self.choice[min(fits)] if fits else ("mma", sparse_mma.DEFAULT_CONFIG)
        prefill = list(astuple(self.prefill)) if self.prefill else []
        if kind == "mma":
            return list(astuple(cfg)), prefill
        return [], list(astuple(cfg)) if kind == "gemm" else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.maskpro.sp24_mm(x2, self.tiles, self.positions, self.out_features,
                                      *self.args_for(x2.shape[0]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 mma.sp layout only"
