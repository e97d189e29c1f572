"""SparseGPT's optimal-brain-surgeon solver for N:M, as pure tensor math (Frantar & Alistarh, 2023).

Columns are pruned left to right in blocks; the error of each pruned column is spread over the columns not
yet processed through the inverse Hessian of the layer's inputs, so the kept weights compensate.
The same solver reconstructs weights for a *given* mask (after MaskPro learned it), and it returns each
weight's value at the moment its group was decided, which gives a dense matrix that MaskPro can learn a
mask on without losing SparseGPT's compensation.

The sequential updates only approximate the best kept weights for the mask they end with: a column's error is
spread over the columns after it, never back over kept columns already passed. :func:`exact_refit` solves the
least-squares problem of each row for its mask instead (``exact=True``; what it gains is measured by
``maskpro-bench refit-ceiling``, docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nm import NM


@dataclass
class ObsResult:
    weight: torch.Tensor    # the reconstructed N:M weight (pruned entries are 0)
    mask: torch.Tensor      # bool, True = kept
    decided: torch.Tensor   # every entry's value when its group was decided (dense)


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, and the mask of dead (never active) inputs."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    for attempt in range(5):  # grow damping if the factorisation fails (rank-deficient calibration)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(percdamp * torch.mean(torch.diag(h)) * 10 ** attempt)
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True), dead


EXACT_MAX_INPUTS = 4096  # exact re-fit solves a K/2-wide system per row: cubic in K, for small models


def check_exact_inputs(k: int, name: str = "this layer") -> None:
    """Refuse, in one line, a layer too wide for :func:`exact_refit` (callers check before long work starts)."""
    if k > EXACT_MAX_INPUTS:
        from .errors import MaskproError

        raise MaskproError(f"{name}: exact re-fit solves a {k // 2}-wide system per row, too slow for {k} inputs "
                           f"(limit {EXACT_MAX_INPUTS}); use --reconstruct obs or block")


def exact_refit(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, percdamp: float = 0.01,
                budget_bytes: int = 2**30) -> torch.Tensor:
    """The kept weights of ``weight`` (rows, K) re-fitted by least squares for the fixed ``mask`` (True = kept).

    Per row with pruned inputs P: ``w' = w - Hinv[:, P] (Hinv[P, P])^-1 w_P``, the minimiser of
    ``(w - w')^T H (w - w')`` over every ``w'`` that is zero on P (H damped as :func:`inverse_hessian_factor`
    damps it). A strict N:M mask prunes as many inputs in every row, so rows are solved in batches of equal
    systems, in float64, ``budget_bytes`` at a time.
    """
    rows, k = weight.shape
    check_exact_inputs(k)
    u, dead = inverse_hessian_factor(hessian.float(), percdamp)
    hinv = (u.T @ u).double()
    w = weight.detach().double().clone()
    w[:, dead] = 0
    pruned = ~mask.bool().to(w.device)
    counts = pruned.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("exact_refit needs a mask that prunes as many inputs in every row (strict N:M)")
    p = int(counts[0])
    if p == 0:
        return weight.clone()
    cols = pruned.nonzero()[:, 1].reshape(rows, p)
    out = torch.empty_like(w)
    step = max(1, budget_bytes // (8 * p * (p + k)))
    for r0 in range(0, rows, step):
        ix = cols[r0:r0 + step]
        z = torch.linalg.solve(hinv[ix[:, :, None], ix[:, None, :]], w[r0:r0 + step].gather(1, ix).unsqueeze(2))
        out[r0:r0 + step] = w[r0:r0 + step] - (hinv[ix].transpose(1, 2) @ z).squeeze(2)
        out[r0:r0 + step].scatter_(1, ix, 0.0)   # exactly zero where pruned (the solve leaves rounding there)
    return out.to(weight.dtype)


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, nm: NM, mask: torch.Tensor | None = None,
              blocksize: int = 128, percdamp: float = 0.01, exact: bool = False) -> ObsResult:
    """Prune ``weight`` (rows, K) to N:M along K, choosing the mask (or using ``mask``) and compensating; with
    ``exact`` the kept weights are then re-fitted by least squares for that mask (:func:`exact_refit`)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    hinv, dead = inverse_hessian_factor(hessian.float(), percdamp)
    w[:, dead] = 0
    kept = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.clone().bool()
    decided = torch.empty_like(w)
    drop = nm.m - nm.n
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = h1[i, i]
            if mask is None and i % nm.m == 0:
                # OBS saliency w^2 / [H^-1]_jj^2 over the group; drop the M-N least salient.
                sal = w1[:, i:i + nm.m] ** 2 / torch.diag(h1)[i:i + nm.m].reshape(1, -1) ** 2
                low = torch.topk(sal, drop, dim=1, largest=False).indices
                kept[:, i1 + i:i1 + i + nm.m] = True
                kept[:, i1 + i:i1 + i + nm.m].scatter_(1, low, False)
            decided[:, i1 + i] = col
            q = col * kept[:, i1 + i]
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if exact:
        return ObsResult(exact_refit(weight, hessian, kept, percdamp), kept, decided.to(weight.dtype))
    return ObsResult(w.to(weight.dtype), kept, decided.to(weight.dtype))
