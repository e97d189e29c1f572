"""RMSNorm, and the residual add fused with the next RMSNorm in one kernel for decode steps.

Why a kernel of our own: in a decode step each block adds a product to the residual twice and normalises the
sum. Inductor fuses that into one reduction kernel, but for rows as wide as a 7B model's (4096) it emits a
looped reduction that reads the row twice, one program per row, so at batch 1 the kernel is a single program
waiting on its loads twice. Here a program holds its whole row in registers: one read of the residual and the
product, one write of the sum and of the normed row.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the reference
    triton = None

MAX_WIDTH = 16384  # wider rows would not fit one program's registers; they take the reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalised in fp32, rounded to ``x``'s dtype, then scaled."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_reference(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + y
    return s, rms_norm(s, weight, eps)


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, s_ptr, h_ptr, n, stride_x, stride_y, eps,
                             BLOCK: tl.constexpr):
        """Row ``program_id``: s = x + y (rounded to the input dtype, as the eager add is), h = RMSNorm(s) * w."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        y = tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        s = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row * n + cols, s, mask=ok)
        sf = s.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / n + eps)
        h = (sf * scale).to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(h_ptr + row * n + cols, h.to(x.dtype), mask=ok)


def _launch(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
            wrap=lambda kernel: kernel) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x.shape
    s = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    h = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    wrap(_add_rms_norm_kernel)[(rows,)](x, y, weight, s, h, n, x.stride(0), y.stride(0), eps, BLOCK=block,
                                        num_warps=max(1, min(16, block // 512)))
    return s, h


if triton is not None and hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("maskpro::add_rms_norm", mutates_args=())
    def _add_rms_norm_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.compile traces into this body: the kernel is launched from the compiled graph, no graph break
        return _launch(x, y, weight, eps, wrap=torch.library.wrap_triton)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + y`` and ``rms_norm(s, weight, eps)`` for rows ``x``, ``y`` [B, hidden] (last dim contiguous):
    the Triton kernel on CUDA, the reference elsewhere (and past :data:`MAX_WIDTH`)."""
    if (x.device.type != "cuda" or triton is None or x.dim() != 2 or x.shape[-1] > MAX_WIDTH
            or x.stride(-1) != 1 or y.stride(-1) != 1):
        return add_rms_norm_reference(x, y, weight, eps)
    return torch.ops.maskpro.add_rms_norm(x, y, weight, eps)
