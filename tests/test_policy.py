import itertools

import pytest
import torch

from maskpro import policy


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (3, 6)])
def test_closed_form_gradient_matches_autograd(n, m):
    torch.manual_seed(n * 10 + m)
    theta = torch.randn(300, m, dtype=torch.float64) * 2
    mask = policy.sample(theta, n)
    t = theta.clone().requires_grad_()
    policy.log_prob(t, mask, n).sum().backward()
    assert torch.allclose(policy.log_prob_grad(theta, mask, n).double(), t.grad, atol=1e-4)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 3), (3, 5)])
def test_subset_probabilities_sum_to_one(n, m):
    theta = torch.randn(1, m)
    total = 0.0
    for s in itertools.combinations(range(m), n):
        mask = torch.zeros(1, m, dtype=torch.bool)
        mask[0, list(s)] = True
        total += float(policy.log_prob(theta, mask, n).exp())
    assert total == pytest.approx(1.0, abs=1e-5)


def test_sampling_frequencies_match_exact_probabilities():
    theta = torch.tensor([[1.0, 0.2, -0.5, 0.7]]).repeat(100_000, 1)
    masks = policy.sample(theta, 2, torch.Generator().manual_seed(0))
    assert torch.all(masks.sum(1) == 2)
    for s in itertools.combinations(range(4), 2):
        ref = torch.zeros(1, 4, dtype=torch.bool)
        ref[0, list(s)] = True
        freq = float((masks == ref).all(1).float().mean())
        assert freq == pytest.approx(float(policy.log_prob(theta[:1], ref, 2).exp()), abs=0.006)


def test_n2_reduces_to_the_official_closed_form():
    """For 2:4 the exact rule equals g_i = 1/p_i + R/(1-p_i)^2 (R = 1/sum 1/(1-p_j)) through softmax."""
    theta = torch.randn(50, 4, dtype=torch.float64)
    mask = policy.sample(theta, 2)
    p = torch.softmax(theta, 1)
    m = mask.double()
    r = 1 / (m / (1 - p)).sum(1, keepdim=True)
    g = m / p + r * m / (1 - p) ** 2
    ref = p * (g - (g * p).sum(1, keepdim=True))
    assert torch.allclose(policy.log_prob_grad(theta, mask, 2).double(), ref, atol=1e-5)


def test_top_n_breaks_ties_by_position_and_is_strict():
    theta = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 2.0, 3.0], [5.0, -1.0, 5.0, 5.0]])
    out = policy.top_n(theta, 2)
    assert out.tolist() == [[True, True, False, False], [False, True, False, True], [True, False, True, False]]


def test_confident_policy_has_no_gradient_on_its_own_mode():
    theta = torch.tensor([[30.0, 30.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    assert policy.log_prob_grad(theta, mask, 2).abs().max() < 1e-6
