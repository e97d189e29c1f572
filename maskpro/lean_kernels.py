"""Lean memory mode's draw and update as two Triton kernels that make their own noise.

The eager lean step writes a uniform noise tensor per layer (4 B per weight), reads it back to draw the mask,
writes it again in the update to redraw the same mask, and copies the new logits over the old ones. Here the
noise is Philox counter-based (``tl.rand(seed, element index)``), so both kernels regenerate it in registers:

* ``draw``: reads the logits (4 B) and the weight (2 B), writes the masked weight (2 B);
* ``update``: reads the logits, redraws the same mask, writes the moved logits in place (4 + 4 B).

The mask is the top-N of ``theta - log(-log(u))`` per group (the Gumbel-top-k draw of :mod:`maskpro.policy`),
the update the closed-form N = 2 score function of ``policy.log_prob_grad``; the tests check both against
those references on the kernels' own noise (``noise``), in Triton's interpreter on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_EPS = 1e-8        # policy._EPS: floor of 1 - p in the score function
BLOCK_G = 256      # groups per program: 1 K elements of fp32 logits, few registers per thread


@triton.jit
def _keep(theta_ptr, seed, G, N: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr):
    """(element index, in-range mask, logits, kept mask) of this program's (BLOCK, M) tile of groups."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, M)
    idx = rows[:, None] * M + cols[None, :]
    ok = (rows[:, None] < G) & (cols[None, :] < M)
    theta = tl.load(theta_ptr + idx, mask=ok, other=0.0)
    u = tl.rand(seed, idx)
    keys = theta - tl.log(-tl.log(tl.maximum(u, 1e-30)))
    # rank = how many entries of the group beat this one (ties: the lower position wins), as policy.rank_top_n
    rank = tl.zeros((BLOCK, M), dtype=tl.int32)
    for j in tl.static_range(M):
        kj = tl.sum(tl.where(cols[None, :] == j, keys, 0.0), axis=1)[:, None]
        beats = (kj > keys) | ((kj == keys) & (cols[None, :] > j))
        rank += beats.to(tl.int32)
    return idx, ok, theta, rank < N


@triton.jit
def _draw_kernel(theta_ptr, w_ptr, out_ptr, seed, G, N: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr):
    idx, ok, _, keep = _keep(theta_ptr, seed, G, N, M, BLOCK)
    w = tl.load(w_ptr + idx, mask=ok, other=0.0)
    tl.store(out_ptr + idx, w * keep.to(w.dtype), mask=ok)


@triton.jit
def _update2_kernel(theta_ptr, adv_ptr, seed, G, M: tl.constexpr, BLOCK: tl.constexpr, EPS: tl.constexpr):
    idx, ok, theta, keep = _keep(theta_ptr, seed, G, 2, M, BLOCK)
    e = tl.exp(theta - tl.max(theta, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    m = keep.to(tl.float32)
    inv = m / tl.maximum(1 - p, EPS)
    pr = p * (inv * inv / tl.sum(inv, axis=1)[:, None])
    grad = m * (1 + pr) - p * (2 + tl.sum(pr, axis=1)[:, None])
    tl.store(theta_ptr + idx, theta + tl.load(adv_ptr) * grad, mask=ok)


@triton.jit
def _noise_kernel(out_ptr, seed, total, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, tl.rand(seed, idx), mask=idx < total)


def supported(theta: torch.Tensor, n: int) -> bool:
    """Whether these kernels take a (G, M) logits tensor for N-of-M masks (else the eager path runs)."""
    g, m = theta.shape
    return (n == 2 and m >= 2 and m & (m - 1) == 0 and m <= 16 and theta.dtype == torch.float32
            and theta.is_contiguous() and g * m < 2 ** 31)


def _grid(theta: torch.Tensor) -> tuple[int]:
    return (triton.cdiv(theta.shape[0], BLOCK_G),)


def _seed(seed: int) -> int:
    return seed & (2 ** 63 - 1)  # a signed 64-bit kernel argument; Philox takes its two 32-bit halves


def draw(theta: torch.Tensor, w: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """W times a mask drawn from softmax(theta) per group, the noise keyed by ``seed`` and element index."""
    out = torch.empty_like(w)
    _draw_kernel[_grid(theta)](theta, w, out, _seed(seed), theta.shape[0], N=n, M=theta.shape[1], BLOCK=BLOCK_G)
    return out


def update_(theta: torch.Tensor, adv: torch.Tensor, seed: int) -> None:
    """In place: theta += adv * d log P(mask) / d theta, the mask redrawn from the same noise as ``draw``."""
    _update2_kernel[_grid(theta)](theta, adv, _seed(seed), theta.shape[0], M=theta.shape[1], BLOCK=BLOCK_G,
                                  EPS=_EPS)


def noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> torch.Tensor:
    """The uniform noise both kernels draw from (for checking them against the eager reference)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    total = out.numel()
    _noise_kernel[(triton.cdiv(total, 1024),)](out, _seed(seed), total, BLOCK=1024)
    return out
