"""Decode attention over the slot cache: one new query per row, each row's keys and values read once.

Why a kernel of our own: a decode step's attention reads the whole cache and does almost no arithmetic, so it
is bound by how many multiprocessors stream it at once. One program per (row, head), as the fused attention
kernels launch for a query of one token, keeps one program per head busy at batch 1, far fewer than a GPU
has multiprocessors. Here the positions
are split into chunks as well (flash-decoding): each program reads one chunk of one row's keys and values for
all query heads that share them (grouped-query attention), and a small reduction merges the chunks (one kernel;
none where a row is one chunk). The kernel rotates the query itself (rotary position embedding), so the step
launches no kernel for it, and it asks for a chunk's values together with its keys, so the two reads overlap.

The valid length of each row comes from a device tensor, so one CUDA graph serves every length up to the
cache's capacity: chunks past a row's length read nothing.
"""

from __future__ import annotations

import math

import torch

from .rotary import rotate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the reference
    triton = None

BLOCK_N = 64  # positions per inner step of a chunk


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Attention of ``q`` [B, H, D] over slots ``0..B-1`` of ``k_cache``/``v_cache`` [S, KVH, C, D], keys
    ``0 .. lengths[b]-1`` of row ``b``; the CPU path and the kernel's reference."""
    b, h, _ = q.shape
    group = h // k_cache.shape[1]
    k = k_cache[:b].repeat_interleave(group, 1).float()
    v = v_cache[:b].repeat_interleave(group, 1).float()
    scores = torch.einsum("bhd,bhcd->bhc", q.float(), k) * scale
    cols = torch.arange(k.shape[2], device=q.device)
    scores = scores.masked_fill(cols[None, None, :] >= lengths.view(b, 1, 1), float("-inf"))
    return torch.einsum("bhc,bhcd->bhd", scores.softmax(-1), v).to(q.dtype)


def splits_for(rows: int, kv_heads: int, capacity: int, sms: int) -> int:
    """Chunks per row: enough programs for four per multiprocessor (each then has few steps in sequence and
    its loads in flight at once), none shorter than one inner step."""
    return max(1, min(math.ceil(4 * sms / (rows * kv_heads)), math.ceil(capacity / BLOCK_N)))


if triton is not None:
    @triton.jit
    def _chunk_kernel(q_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, len_ptr, o_ptr, ml_ptr, out_ptr, scale, KVH,
                      stride_qb, stride_qh, stride_cb, stride_kb, stride_kh, stride_kc, SPLITS,
                      CHUNK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      PREC: tl.constexpr, ROPE: tl.constexpr, DIRECT: tl.constexpr):
        """Partial attention of one chunk of one row's positions for the G query heads of one KV head.

        With ``ROPE`` the query is rotated first by row ``b``'s ``cos``/``sin`` [B, D]. Writes the unnormalised
        output [G, D] and (running max, sum of exponentials) per head to ``o_ptr`` [B, KVH, SPLITS, G, D] and
        ``ml_ptr`` [B, KVH, SPLITS, G, 2] (fp32), or with ``DIRECT`` (one chunk per row) the normalised output to
        ``out_ptr`` [B, H, D]: the real heads only, not the rows ``tl.dot`` was padded with.
        """
        pid = tl.program_id(0)
        s = tl.program_id(1)
        b = pid // KVH
        kvh = pid % KVH
        length = tl.load(len_ptr + b)
        gi = tl.arange(0, GP)
        dd = tl.arange(0, D)
        real = gi < G
        q_rows = q_ptr + b * stride_qb + (kvh * G + gi)[:, None] * stride_qh
        q = tl.load(q_rows + dd[None, :], mask=real[:, None], other=0.0)
        if ROPE:  # q * cos + rotate_half(q) * sin, rotate_half(q)[d] = -q[d + D/2] (d < D/2), q[d - D/2] after
            half = tl.load(q_rows + ((dd + D // 2) % D)[None, :], mask=real[:, None], other=0.0).to(tl.float32)
            half = tl.where((dd < D // 2)[None, :], -half, half)
            cos = tl.load(cos_ptr + b * stride_cb + dd).to(tl.float32)
            sin = tl.load(sin_ptr + b * stride_cb + dd).to(tl.float32)
            q = (q.to(tl.float32) * cos[None, :] + half * sin[None, :]).to(q_ptr.dtype.element_ty)
        m = tl.full((GP,), float("-inf"), tl.float32)
        l = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        base = b * stride_kb + kvh * stride_kh
        stop = tl.minimum(s * CHUNK + CHUNK, length)
        for i in tl.range(0, CHUNK, BLOCK):
            n0 = s * CHUNK + i
            if n0 < stop:  # a uniform branch: steps past the row's length read nothing
                cols = n0 + tl.arange(0, BLOCK)
                ok = cols < stop
                offs = base + cols[:, None] * stride_kc + dd[None, :]
                k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)
                v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)   # asked for now: in flight with k
                scores = (tl.dot(q, tl.trans(k), input_precision=PREC) * scale).to(tl.float32)  # [GP, BLOCK]
                scores = tl.where(ok[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(scores - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
                m = m_new
        if DIRECT:
            out = acc / l[:, None]
            tl.store(out_ptr + (b * KVH * G + kvh * G + gi)[:, None] * D + dd[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=real[:, None])
        else:
            part = (pid * SPLITS + s) * G
            tl.store(o_ptr + (part + gi)[:, None] * D + dd[None, :], acc, mask=real[:, None])
            tl.store(ml_ptr + (part + gi) * 2, m, mask=real)
            tl.store(ml_ptr + (part + gi) * 2 + 1, l, mask=real)

    @triton.jit
    def _merge_kernel(o_ptr, ml_ptr, out_ptr, SPLITS, G: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
        """One query head's output from its chunks' partial results (``_chunk_kernel``'s layout): each chunk
        weighed by exp(its max - the largest max); chunks past the row's length (max -inf) weigh nothing."""
        pid = tl.program_id(0)          # b * H + kvh * G + g
        g = pid % G
        s = tl.arange(0, SP)
        ok = s < SPLITS
        part = ((pid // G) * SPLITS + s) * G + g
        m = tl.load(ml_ptr + part * 2, mask=ok, other=float("-inf"))
        l = tl.load(ml_ptr + part * 2 + 1, mask=ok, other=0.0)
        w = tl.where(m > float("-inf"), tl.exp(m - tl.max(m, 0)), 0.0)
        dd = tl.arange(0, D)
        o = tl.load(o_ptr + part[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(out_ptr + pid * D + dd, out.to(out_ptr.dtype.element_ty))


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float,
            splits: int, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
            wrap=lambda kernel: kernel) -> torch.Tensor:
    b, h, d = q.shape
    kvh, capacity = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    gp = max(16, triton.next_power_of_2(group))  # tl.dot wants 16 rows at least; spare rows are masked
    chunk = triton.cdiv(triton.cdiv(capacity, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(capacity, chunk)        # chunks that hold a position (fewer where chunks round up)
    rope = cos is not None
    if rope:
        cos, sin = cos.reshape(b, d), sin.reshape(b, d)
    direct = splits == 1
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    o = torch.empty((b, kvh, splits, group, d) if not direct else (1,), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, kvh, splits, group, 2) if not direct else (1,), dtype=torch.float32, device=q.device)
    wrap(_chunk_kernel)[(b * kvh, splits)](
        q, cos if rope else q, sin if rope else q, k_cache, v_cache, lengths, o, ml, out, scale, kvh, q.stride(0),
        q.stride(1), cos.stride(0) if rope else 0, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), splits,
        CHUNK=chunk, G=group, GP=gp, D=d, BLOCK=BLOCK_N, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        ROPE=rope, DIRECT=direct, num_warps=4)
    if not direct:
        wrap(_merge_kernel)[(b * h,)](o, ml, out, splits, G=group, SP=triton.next_power_of_2(splits), D=d,
                                      num_warps=4)
    return out


if triton is not None and hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("maskpro::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                             scale: float, splits: int, cos: torch.Tensor | None = None,
                             sin: torch.Tensor | None = None) -> torch.Tensor:
        # torch.compile traces into this body: the kernels are launched from the compiled graph, no graph break
        return _launch(q, k_cache, v_cache, lengths, scale, splits, cos, sin, wrap=torch.library.wrap_triton)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     splits: int, scale: float | None = None, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row (``q`` [B, H, D], head_dim contiguous) over the first B slots of
    the cache ([S, KVH, C, D], head_dim contiguous), row ``b`` seeing keys ``0 .. lengths[b]-1`` (a device
    tensor), the positions of a row split into ``splits`` chunks (:func:`splits_for`). With ``cos``/``sin``
    (each row's, [B, 1, D] or [B, D]) the query is rotated first (:func:`~maskpro.serve.rotary.rotate`). The
    Triton kernels on CUDA, the reference elsewhere."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type != "cuda" or triton is None:
        if cos is not None:
            q = rotate(q, cos.reshape(q.shape[0], 1, -1), sin.reshape(q.shape[0], 1, -1))
        return reference(q, k_cache, v_cache, lengths, scale)
    return torch.ops.maskpro.decode_attention(q, k_cache, v_cache, lengths, scale, splits, cos, sin)
