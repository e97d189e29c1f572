"""MaskPro's policy over N:M masks, as pure tensor math.

Every group of M consecutive weights has a categorical distribution ``p = softmax(theta)`` over its M
positions, and a mask is N draws from it without replacement. Logits are stored one per weight, so memory
is linear in the model size (MaskLLM needs C(M, N) per group).

* Sampling uses the Gumbel-top-k trick: the N largest of ``theta - log(E)``, ``E ~ Exp(1)``, are an exact
  draw of N positions without replacement (Plackett-Luce), fully vectorised.
* The score function is the exact gradient of ``log P(S)`` for the *unordered* subset S, for any N:

      P(S) = sum over orderings s of S of  prod_k p_{s_k} / (1 - p_{s_1} - ... - p_{s_{k-1}})

  With ``r_i = E_w[ sum_{k after i} 1 / D_k ]`` (w: posterior over orderings given S) the gradient with
  respect to the logits is ``mask * (1 + p * r) - p * (N + sum_S p * r)``, which needs no division by
  small probabilities. For N = 2 this reduces to the update rule of the official code; for other N the
  official code has no rule.
"""

from __future__ import annotations

import itertools
import math

import torch

_EPS = 1e-8


def rank_top_n(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean (G, M) mask of the n largest keys per row (ties: lower position wins).

    Counts, for every entry, how many entries of its group beat it: M elementwise passes, which fuse and
    run far faster on GPUs than ``torch.topk`` over millions of rows of length M.
    """
    m = keys.shape[1]
    pos = torch.arange(m, device=keys.device)
    rank = torch.zeros(keys.shape, dtype=torch.int32, device=keys.device)
    for j in range(m):
        col = keys[:, j:j + 1]
        rank += (col > keys) | ((col == keys) & (pos > j))
    return rank < n


def gumbel_keys(theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Perturbed logits whose top-n is a Plackett-Luce draw: theta - log(Exp(1)), Exp(1) = -log(U)."""
    return theta.float() - torch.log(-torch.log(u.clamp_min(1e-30)))


def sample_from_uniform(theta: torch.Tensor, u: torch.Tensor, n: int) -> torch.Tensor:
    """A mask drawn from softmax(theta) without replacement, given uniform noise ``u`` of theta's shape."""
    return rank_top_n(gumbel_keys(theta, u), n)


def sample(theta: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a boolean (G, M) mask with exactly n True per row from softmax(theta) without replacement."""
    u = torch.rand(theta.shape, generator=generator, device=theta.device)
    return sample_from_uniform(theta, u, n)


def top_n(theta: torch.Tensor, n: int) -> torch.Tensor:
    """The final (most likely) mask: the n largest logits of every group."""
    return rank_top_n(theta, n)


def _orderings(n: int) -> list[tuple[int, ...]]:
    if math.factorial(n) > 5040:
        raise ValueError(f"exact subset probabilities enumerate N! orderings; N={n} is too large (N <= 7)")
    return list(itertools.permutations(range(n)))


def _slots(mask: torch.Tensor, n: int) -> torch.Tensor:
    """For every entry, its slot 0..n-1 among the kept entries of its group, or n if not kept.

    Kept entries are gathered into (G, n) by scattering to these slots (slot n is a discard column),
    which avoids a top-k over millions of tiny rows.
    """
    slot = torch.cumsum(mask, dim=1, dtype=torch.int64) - 1
    return torch.where(mask, slot, n)


def _gather_kept(p: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(p.shape[0], n + 1, dtype=p.dtype, device=p.device).scatter_(1, slots, p)[:, :n]


def log_prob(theta: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """log P(S) of each group's kept subset S (exact; autograd-friendly, used as the reference)."""
    p = torch.softmax(theta.float(), dim=1)
    q = _gather_kept(p, _slots(mask, n), n)
    terms = []
    for order in _orderings(n):
        qs = q[:, list(order)]
        denom = (1 - torch.cumsum(qs, dim=1)[:, :-1]).clamp_min(_EPS)
        terms.append(qs.log().sum(1) - denom.log().sum(1))
    return torch.logsumexp(torch.stack(terms, 1), dim=1)


def _log_prob_grad_n2(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """N = 2 in row-local elementwise form (r_i = R / (1 - p_i)^2, R = 1 / sum_S 1 / (1 - p_j)).

    No gathers or scatters, so a compiler fuses it into one pass over the logits.
    """
    p = torch.softmax(theta.float(), dim=1)
    m = mask.to(p.dtype)
    inv = m / (1 - p).clamp_min(_EPS)
    r = inv * inv / inv.sum(1, keepdim=True)
    pr = p * r
    return m * (1 + pr) - p * (2 + pr.sum(1, keepdim=True))


def log_prob_grad(theta: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """d log P(S) / d theta, shape (G, M), closed form (no autograd, one pass of elementwise work)."""
    if n == 2:
        return _log_prob_grad_n2(theta, mask)
    p = torch.softmax(theta.float(), dim=1)
    slots = _slots(mask, n)
    q = _gather_kept(p, slots, n).clamp_min(1e-30)        # (G, n); floor keeps the logs finite
    if n == 1:                                            # categorical: onehot - p
        r = torch.zeros_like(q)
    else:
        orders = _orderings(n)
        logt, tails = [], []
        for order in orders:
            qs = q[:, list(order)]
            inv_d = 1.0 / (1 - torch.cumsum(qs, dim=1)[:, :-1]).clamp_min(_EPS)   # 1/D_2 .. 1/D_n
            logt.append(qs.log().sum(1) + inv_d.log().sum(1))
            # for the element at ordering position j: sum of 1/D_k over k > j, i.e. reversed cumsum
            tail = torch.flip(torch.cumsum(torch.flip(inv_d, [1]), 1), [1])           # positions 0..n-2
            tail = torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], 1)              # last has none
            inverse = sorted(range(n), key=lambda k: order[k])                         # to subset order
            tails.append(tail[:, inverse])
        w = torch.softmax(torch.stack(logt, 1), dim=1)                                # (G, n!)
        r = (w.unsqueeze(2) * torch.stack(tails, 1)).sum(1)                            # (G, n)
    pr = q * r
    pr_full = torch.cat([pr, pr.new_zeros(pr.shape[0], 1)], 1).gather(1, slots)       # back to (G, M)
    return mask * (1 + pr_full) - p * (n + pr.sum(1, keepdim=True))
