"""Choosing each row's next token from its logits: penalties, greedy, temperature and nucleus sampling."""

from __future__ import annotations

import torch

from .request import GenerationRequest

__all__ = ["sample"]


def sample(reqs: list[GenerationRequest], logits: torch.Tensor) -> torch.Tensor:
    """The next token of each row ([B] long); ``logits`` ([B, V] float) is changed in place by penalties.

    A request with temperature 0 is greedy; the others draw from their own seeded generator."""
    for i, r in enumerate(reqs):
        if r.counts is not None:
            logits[i] -= r.params.frequency_penalty * r.counts + r.params.presence_penalty * (r.counts > 0)
    tokens = logits.argmax(-1)
    rows = [i for i, r in enumerate(reqs) if r.generator is not None]
    if rows:
        # one batched softmax and CDF; each row draws a single uniform number from its own seeded
        # generator and takes the first token whose CDF exceeds it (exact, and cheap for wide vocabularies)
        drawing = [reqs[i] for i in rows]
        temps = torch.tensor([r.params.temperature for r in drawing], device=logits.device)
        probs = torch.softmax(logits[rows] / temps[:, None], -1)
        for j, r in enumerate(drawing):
            if r.params.top_p < 1.0:  # nucleus: the smallest set of most likely tokens reaching top_p
                sorted_p, order = probs[j].sort(descending=True)
                sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= r.params.top_p] = 0.0
                probs[j] = torch.zeros_like(probs[j]).scatter_(0, order, sorted_p)
        cdf = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=r.generator, device=logits.device) for r in drawing]) * cdf[:, -1]
        drawn = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
        tokens[rows] = drawn
    return tokens
