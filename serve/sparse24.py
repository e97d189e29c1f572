"""2:4 compressed weights and the Triton kernel that multiplies by them without a dense copy.

Format of a 2:4 weight ``W`` (out N, in K), sparse along K: ``values`` (N, K/2) holds the two kept values of
each group of 4 in order; ``meta`` (N, K/8) uint8 holds 4 bits per group (two groups a byte, low nibble
first): bits 0-1 the position of the first kept value, bits 2-3 the second. That is 1.125 bytes per dense
fp16 pair, 56% of the dense bytes, which is the most a memory-bound decode GEMM can gain (1.78x).

Three Triton kernels read ``values``/``meta`` as stored, so decode reads 56% of the bytes dense cuBLAS reads:
two CUDA-core decode kernels (up to 16 tokens; the word kernel loads each group's pair as one 32-bit word)
and a tensor-core kernel that expands a tile in registers for ``tl.dot``. Pure torch
``compress_24``/``decompress_24`` are the reference and the CPU path.
"""

from __future__ import annotations

import torch

from maskpro.errors import MaskproError
from maskpro.nm import NM, violations

NM24 = NM(2, 4)


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of a weight whose groups of 4 along K hold at most 2 non-zeros.

    Groups with fewer than 2 non-zeros keep zeros at the lowest free positions, so every group stores
    exactly two (position, value) pairs.
    """
    n, k = weight.shape
    if k % 8:
        raise MaskproError(f"2:4 compression needs in_features divisible by 8, got {k}; keep this layer dense")
    if violations(weight, NM24).numel():
        raise MaskproError("weight is not 2:4 along its input dimension; check it with maskpro-check")
    groups = weight.reshape(n, k // 4, 4)
    nonzero = groups != 0
    # Rank positions: non-zeros first (stable, by position), then the rest; keep the first two, sorted.
    order = torch.sort((~nonzero).to(torch.int8) * 4 + torch.arange(4, device=weight.device), dim=-1).indices
    idx = torch.sort(order[..., :2], dim=-1).values                       # (n, k/4, 2) positions, ascending
    values = torch.gather(groups, -1, idx).reshape(n, k // 2).contiguous()
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)              # (n, k/4)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()              # (n, k/8)
    return values, meta


def group_nibbles(meta: torch.Tensor) -> torch.Tensor:
    """(N, K/4) int64: each group's 4 position bits from ``meta`` (first position in bits 0-1)."""
    return torch.stack([meta & 15, meta >> 4], dim=-1).reshape(meta.shape[0], -1).to(torch.long)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (N, K) weight back from ``compress_24``'s output (reference and CPU fallback)."""
    n, half = values.shape
    k = half * 2
    nib = group_nibbles(meta)
    idx = torch.stack([nib & 3, nib >> 2], dim=-1)                        # (n, k/4, 2)
    dense = torch.zeros(n, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


try:  # Triton is optional: CPU installs and the tests without a GPU use the torch path above.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:
    @triton.jit
    def _tile(BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's output rows and tokens (grid: N tiles x token tiles)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        return rn, rt

    @triton.jit
    def _inputs_of_kept(i0, i1, x0, x1, x2, x3):
        """The x entry each of a group's two kept values multiplies (first kept sits at 0-2, second at 1-3)."""
        s0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
        s1 = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
        return s0, s1


if triton is not None:
    @triton.jit
    def _sp24_kernel(x_ptr, v_ptr, m_ptr, y_ptr, T, N, K: tl.constexpr, stride_xt, stride_yt,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[T, N] = x[T, K] @ W.T with W as 2:4 values + meta; a tile of N rows and T tokens per program.

        Computes y.T = W @ x.T so the expanded weight tile is the MMA's A operand as loaded (no transpose);
        a contiguous values tile is split into its two slots and expanded in registers.
        """
        G: tl.constexpr = BLOCK_K // 4
        rn, rt = _tile(BLOCK_T, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        t_ok = rt < T
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        v_rows = v_ptr + rn[:, None].to(tl.int64) * (K // 2)
        m_rows = m_ptr + rn[:, None].to(tl.int64) * (K // 8)
        for k0 in tl.range(0, K, BLOCK_K):
            vals = tl.load(v_rows + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :])   # (BN, BK/2)
            v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, G, 2)))                    # (BN, G) each
            g = k0 // 4 + tl.arange(0, G)
            mb = tl.load(m_rows + (g // 2)[None, :]).to(tl.int32)
            nib = (mb >> ((g % 2) * 4)[None, :]) & 15
            i0 = nib & 3
            i1 = nib >> 2
            zero = tl.zeros_like(v0)
            w0 = tl.where(i0 == 0, v0, zero)
            w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
            w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
            w3 = tl.where(i1 == 3, v1, zero)
            w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))
            xt = tl.load(x_ptr + rt[None, :] * stride_xt + (k0 + rk)[:, None], mask=t_ok[None, :], other=0.0)
            acc += tl.dot(w, xt)                  # (BN, BK) @ (BK, BT)
        y = y_ptr + rt[None, :] * stride_yt + rn[:, None]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_ok[None, :] & (rn < N)[:, None])


if triton is not None:
    @triton.jit
    def _sp24_gemv_kernel(x_ptr, v_ptr, m_ptr, y_ptr, T, N, K: tl.constexpr, stride_xt, stride_yt,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr):
        """Decode: CUDA-core FMAs on the kept values only, for up to BLOCK_T tokens per weight read.

        The x tile is split into its four positions per group, and each kept value picks its input with
        selects, so the weights are read once, as compressed, and nothing is gathered or expanded.
        """
        G: tl.constexpr = BLOCK_K // 4
        rn, rt = _tile(BLOCK_T, BLOCK_N)
        t_ok = rt < T
        acc = tl.zeros((BLOCK_T, BLOCK_N, G), dtype=tl.float32)
        v_rows = v_ptr + rn[:, None].to(tl.int64) * (K // 2)
        m_rows = m_ptr + rn[:, None].to(tl.int64) * (K // 8)
        for k0 in tl.range(0, K, BLOCK_K):
            # Weights are streamed once: load them contiguously and let them leave the cache first.
            jh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            jm = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            if EVEN_K:
                vals = tl.load(v_rows + jh[None, :], eviction_policy="evict_first").to(tl.float32)
                mb = tl.load(m_rows + jm[None, :], eviction_policy="evict_first").to(tl.int32)
            else:  # the last tile runs past K: masked values are 0 and contribute nothing
                vals = tl.load(v_rows + jh[None, :], mask=(jh < K // 2)[None, :], other=0.0,
                               eviction_policy="evict_first").to(tl.float32)
                mb = tl.load(m_rows + jm[None, :], mask=(jm < K // 8)[None, :], other=0,
                             eviction_policy="evict_first").to(tl.int32)
            v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, G, 2)))
            nib = tl.reshape(tl.join(mb & 15, mb >> 4), (BLOCK_N, G))         # low nibble = even group
            i0 = (nib & 3)[None, :, :]
            i1 = (nib >> 2)[None, :, :]
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + rt[:, None] * stride_xt + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :],
                         other=0.0).to(tl.float32)
            e0, e1 = tl.split(tl.reshape(xv, (BLOCK_T, G, 2, 2)))   # e0[t, g, i] = x[t, 4g+2i], e1: +1
            x0, x2 = tl.split(e0)
            x1, x3 = tl.split(e1)
            x0 = x0[:, None, :]
            x1 = x1[:, None, :]
            x2 = x2[:, None, :]
            x3 = x3[:, None, :]
            s0, s1 = _inputs_of_kept(i0, i1, x0, x1, x2, x3)
            acc += v0[None, :, :] * s0 + v1[None, :, :] * s1
        out = tl.sum(acc, axis=2)                                   # (BLOCK_T, BLOCK_N)
        y = y_ptr + rt[:, None] * stride_yt + rn[None, :]
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & (rn < N)[None, :])


if triton is not None:
    @triton.jit
    def _sp24_words_kernel(x_ptr, v_ptr, m_ptr, y_ptr, T, N, K: tl.constexpr, stride_xt, stride_yt,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           EVEN_K: tl.constexpr):
        """Decode like ``_sp24_gemv_kernel``, with every tile in one register layout (no reshape or split).

        Each group's two kept fp16 values are one 32-bit word: a (BLOCK_N, groups) tile of words is one
        contiguous, vectorised load, and both values come out of it with shifts and bit casts. The four x
        inputs of each group are read with a stride (x is small and stays in L1), so selecting a value's
        input needs no shuffle between threads.
        """
        G: tl.constexpr = BLOCK_K // 4
        rn, rt = _tile(BLOCK_T, BLOCK_N)
        rg = tl.arange(0, G)
        t_ok = rt < T
        acc = tl.zeros((BLOCK_T, BLOCK_N, G), dtype=tl.float32)
        w_rows = v_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None].to(tl.int64) * (K // 4)
        m_rows = m_ptr + rn[:, None].to(tl.int64) * (K // 8)
        x_rows = x_ptr + rt[:, None, None] * stride_xt
        for k0 in tl.range(0, K, BLOCK_K):
            g = k0 // 4 + rg
            g_ok = g < K // 4
            if EVEN_K:
                words = tl.load(w_rows + g[None, :], eviction_policy="evict_first")
                mb = tl.load(m_rows + (g // 2)[None, :], eviction_policy="evict_first").to(tl.int32)
            else:  # the last tile runs past K: masked words are 0 (two zero values) and add nothing
                words = tl.load(w_rows + g[None, :], mask=g_ok[None, :], other=0, eviction_policy="evict_first")
                mb = tl.load(m_rows + (g // 2)[None, :], mask=g_ok[None, :], other=0,
                             eviction_policy="evict_first").to(tl.int32)
            v0 = (words & 0xFFFF).to(tl.uint16).to(v_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            v1 = ((words >> 16) & 0xFFFF).to(tl.uint16).to(v_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            nib = (mb >> ((g % 2) * 4)[None, :]) & 15
            i0 = (nib & 3)[None, :, :]
            i1 = (nib >> 2)[None, :, :]
            xk = x_rows + 4 * g[None, None, :]
            xm = t_ok[:, None, None] & g_ok[None, None, :]
            x0 = tl.load(xk, mask=xm, other=0.0).to(tl.float32)
            x1 = tl.load(xk + 1, mask=xm, other=0.0).to(tl.float32)
            x2 = tl.load(xk + 2, mask=xm, other=0.0).to(tl.float32)
            x3 = tl.load(xk + 3, mask=xm, other=0.0).to(tl.float32)
            s0, s1 = _inputs_of_kept(i0, i1, x0, x1, x2, x3)
            acc += v0[None, :, :] * s0 + v1[None, :, :] * s1
        out = tl.sum(acc, axis=2)                                   # (BLOCK_T, BLOCK_N)
        y = y_ptr + rt[:, None] * stride_yt + rn[None, :]
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & (rn < N)[None, :])


def kernel_ok(n: int, k: int, block_n: int = 32, block_k: int = 256, expand: int = 0) -> bool:
    """Whether a kernel config covers this shape (the decode kernel masks a partial last K tile)."""
    return triton is not None and n % block_n == 0 and k % 8 == 0 and (expand in (2, 3) or k % block_k == 0)


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, block_n: int = 32,
                block_k: int = 256, num_warps: int = 4, num_stages: int = 3, expand: int = 0) -> torch.Tensor:
    """``x @ W.T`` for 2-D ``x`` (T, K) and a compressed W (N, K): the Triton kernel on CUDA, torch elsewhere."""
    n, k = values.shape[0], values.shape[1] * 2
    if (x.device.type != "cuda" or not kernel_ok(n, k, block_n, block_k, expand)
            or (expand == 3 and values.element_size() != 2)):  # the word kernel packs two 16-bit values
        return x @ decompress_24(values, meta).T
    t = x.shape[0]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if expand in (2, 3):  # CUDA-core decode kernels: all tokens (up to 16) per weight read
        block_t = 1 if t == 1 else (2 if t == 2 else (4 if t <= 4 else (8 if t <= 8 else 16)))
        kernel = _sp24_words_kernel if expand == 3 else _sp24_gemv_kernel
        kernel[(n // block_n, triton.cdiv(t, block_t))](
            x, values, meta, y, t, n, k, x.stride(0), y.stride(0), BLOCK_T=block_t, BLOCK_N=block_n,
            BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages)
        return y
    block_t = 16 if t <= 16 else (32 if t <= 32 else 64)
    grid = (n // block_n, triton.cdiv(t, block_t))
    _sp24_kernel[grid](x, values, meta, y, t, n, k, x.stride(0), y.stride(0), BLOCK_T=block_t, BLOCK_N=block_n,
                       BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y
