"""SparseGPT's optimal-brain-surgeon solver for N:M, as pure tensor math (Frantar & Alistarh, 2023).

Columns are pruned left to right in blocks; the error of each pruned column is spread over the columns not
yet processed through the inverse Hessian of the layer's inputs, so the kept weights compensate.
The same solver reconstructs weights for a *given* mask (after MaskPro learned it), and it returns each
weight's value at the moment its group was decided, which gives a dense matrix that MaskPro can learn a
mask on without losing SparseGPT's compensation.
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


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, nm: NM, mask: torch.Tensor | None = None,
              blocksize: int = 128, percdamp: float = 0.01) -> ObsResult:
    """Prune ``weight`` (rows, K) to N:M along K, choosing the mask (or using ``mask``) and compensating."""
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
    return ObsResult(w.to(weight.dtype), kept, decided.to(weight.dtype))
