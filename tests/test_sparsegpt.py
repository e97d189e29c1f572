import pytest
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


def test_exact_refit_is_the_least_squares_fit_of_the_mask_and_beats_the_sequential_updates():
    from maskpro.errors import MaskproError
    from maskpro.sparsegpt import exact_refit

    torch.manual_seed(0)
    x = torch.randn(4000, 64) @ torch.randn(64, 64)    # correlated inputs: where the sequential updates fall short
    h, w = x.T @ x, torch.randn(24, 64)
    seq = obs_prune(w, h, NM(2, 4))
    exact = obs_prune(w, h, NM(2, 4), exact=True)
    assert torch.equal(exact.mask, seq.mask) and torch.equal(exact.decided, seq.decided)
    assert bool((exact.weight[~exact.mask] == 0).all())
    damped = h + 0.01 * h.diag().mean() * torch.eye(64)

    def err(v):
        return (((w - v) @ damped) * (w - v)).sum(1)
    assert bool((err(exact.weight) <= err(seq.weight) * (1 + 1e-5)).all()) and err(exact.weight).sum() < 0.99 * err(
        seq.weight).sum()
    for _ in range(5):  # no change of the kept weights does better (the gradient on them is zero)
        nudge = torch.randn_like(w) * 1e-2 * exact.mask
        assert bool((err(exact.weight + nudge) >= err(exact.weight) - 1e-4).all())
    with pytest.raises(ValueError, match="strict N:M"):
        exact_refit(w, h, torch.ones_like(w, dtype=torch.bool).index_fill_(1, torch.tensor([0]), False)
                    .index_fill_(0, torch.tensor([0]), True))
    with pytest.raises(MaskproError, match="use --reconstruct obs or block"):
        exact_refit(torch.zeros(2, 8192), torch.eye(8192), torch.ones(2, 8192, dtype=torch.bool))


def test_cli_refits_exactly_and_refuses_wide_layers_before_any_work(tiny_model_dir, data_root, tmp_path,
                                                                    monkeypatch, capsys):
    import json

    from maskpro.cli import main

    argv = ["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--reconstruct", "exact",
            "--calib-samples", "4", "--calib-seq-len", "64", "--data-dir", str(data_root), "-q"]
    out = tmp_path / "wanda-exact"
    assert main([*argv, "--out", str(out)]) == 0
    meta = json.loads((out / "maskpro.json").read_text())
    assert meta["method"] == "wanda+exact" and meta["reconstructed"]["method"] == "least-squares"
    assert main(["check", "--model", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("maskpro.sparsegpt.EXACT_MAX_INPUTS", 16)   # every tiny layer is now "too wide"
    monkeypatch.setattr("maskpro.pipeline.data.calibration_windows",
                        lambda *a, **k: pytest.fail("calibration read before the width check"))
    assert main([*argv, "--out", str(tmp_path / "wide")]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]   # progress bars aside
    assert len(err) == 1 and "model.layers.0." in err[0] and "use --reconstruct obs or block" in err[0]
    assert not (tmp_path / "wide").exists()
