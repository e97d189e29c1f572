"""The step's advantage: the paper's rule, its per-block form, and the RMS-normalized option."""

import math

import torch

from maskpro.advantage import advantage_


def test_paper_rule_residual_minus_moving_average_times_minus_lr():
    delta, var = torch.tensor(0.5), torch.zeros(())
    adv = advantage_(torch.tensor(2.0), delta, var, ema=0.9, lr=10.0, step=3, normalize=False)
    assert math.isclose(float(delta), 0.5 * 0.9 + 2.0 * 0.1, rel_tol=1e-6)       # baseline first
    assert math.isclose(float(adv), -10.0 * (2.0 - float(delta)), rel_tol=1e-6)  # then the centred residual
    assert float(var) == 0.0                                                    # untouched unless normalizing


def test_per_block_vectors_and_a_non_finite_entry_skipped_alone():
    delta, var = torch.zeros(3), torch.zeros(3)
    adv = advantage_(torch.tensor([1.0, float("inf"), -1.0]), delta, var, ema=0.5, lr=1.0, step=0,
                     normalize=False)
    assert adv.tolist() == [-0.5, 0.0, 0.5] and delta.tolist() == [0.5, 0.0, -0.5]


def test_normalized_advantage_has_unit_scale_whatever_the_loss_scale():
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1.0, 1e3):   # block errors of 1e-6 and LM losses of ~1 get the same step size
        delta, var = torch.zeros(()), torch.zeros(())
        advs = [float(advantage_(torch.randn((), generator=gen) * scale, delta, var, ema=0.99, lr=1.0, step=t,
                                 normalize=True)) for t in range(400)]
        rms = math.sqrt(sum(a * a for a in advs[100:]) / 300)
        assert 0.7 < rms < 1.4, (scale, rms)
