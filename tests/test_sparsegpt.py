import torch

from maskpro.nm import NM, check_weight, topn_mask
from maskpro.sparsegpt import obs_prune


def _problem(seed=0, rows=32, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    x = base @ torch.randn(8, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)  # correlated inputs
    w = torch.randn(rows, cols, generator=g)
    return w, x, 2 * x.T @ x / n


def test_obs_beats_magnitude_on_layer_output_error():
    w, x, h = _problem()
    nm = NM(2, 4)
    res = obs_prune(w, h, nm, blocksize=16)
    assert check_weight(res.weight, nm, "w", strict=True) == []
    mag = w * topn_mask(w.abs(), nm)
    err = lambda v: float(((w - v) @ x.T).pow(2).mean())
    assert err(res.weight) < 0.5 * err(mag)


def test_fixed_mask_is_kept_and_weights_refit():
    w, x, h = _problem(1)
    nm = NM(2, 4)
    mask = topn_mask(torch.rand_like(w), nm)
    res = obs_prune(w, h, nm, mask=mask)
    assert torch.equal(res.mask, mask)
    assert torch.all(res.weight[~mask] == 0)
    err = lambda v: float(((w - v) @ x.T).pow(2).mean())
    assert err(res.weight) < err(w * mask)


def test_decided_values_equal_kept_weights():
    w, _, h = _problem(2)
    res = obs_prune(w, h, NM(2, 4))
    assert torch.allclose(res.decided[res.mask], res.weight[res.mask])
