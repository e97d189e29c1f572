"""The advantage of a MaskPro step: the loss residual against the prior, minus its moving average.

Pure tensor math on the device (no host sync). The residual is a scalar for the paper's losses and a vector
(one per decoder block) for ``loss="local"``; everything here is elementwise, so both take the same path.
With ``normalize`` the centred residual is also divided by the running root-mean-square of itself
(bias-corrected like Adam's second moment), so ``lr`` is in units of the residual's own spread: block-local
residuals differ by orders of magnitude between early and late blocks, and a loss's scale would otherwise be
baked into its learning rate.
"""

from __future__ import annotations

import torch


def advantage_(res: torch.Tensor, delta: torch.Tensor, var: torch.Tensor, *, ema: float, lr: float, step: int,
               normalize: bool) -> torch.Tensor:
    """-lr * (res - baseline) [/ rms]; updates the moving average ``delta`` (and ``var``) in place.

    A non-finite residual (fp16 overflow under an extreme draw) leaves the statistics alone and gives 0.
    """
    ok = torch.isfinite(res)
    res0 = torch.where(ok, res, 0.0)
    delta.copy_(torch.where(ok, delta * ema + res0 * (1 - ema), delta))
    centred = res0 - delta
    if normalize:
        var.copy_(torch.where(ok, var * ema + centred * centred * (1 - ema), var))
        rms = (var / (1 - ema ** (step + 1))).sqrt().clamp_min(1e-12)
        centred = centred / rms
    return torch.where(ok, centred * -lr, 0.0)
