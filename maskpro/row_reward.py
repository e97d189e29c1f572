"""Row-local rewards for the MaskPro learner: every output row of every linear is scored by its own error.

The paper's learner scores a sampled mask with one number, the change of the LM loss, shared by every group of
the model; ``maskpro-bench reward-snr`` measured that a step then carries almost nothing about any single group,
while one reward per output row (the groups of one row share it, a few hundred instead of millions) carries
far more (docs/results.md). With ``loss="row"`` the reward of row r of layer l is its squared output error on
the dense model's inputs to that layer, relative to the dense row's output energy:

    err_r = (w_r - s_r * m_r)^T H (w_r - s_r * m_r) / (w_r^T H w_r),   H = X^T X over every learning token,

with w the dense weights, s the source weights the learner masks and m the drawn mask. H sums all learning
tokens once, so a row's reward is exact, not a minibatch estimate, and a step needs no forward pass: with
D = s * (m - m_prior) (nonzero only where the draw left the prior) the residual against the prior is

    err_r(m) - err_r(prior) = (-2 D_r . G_r + D_r^T H D_r) / (w_r^T H w_r),   G = (w - s * m_prior) H,

G computed once. The residual, moving-average baseline and score-function update are the paper's, one per row;
rows differ by orders of magnitude in how much their draws matter, so their advantages are normalized
(``LearnerConfig.normalize``). With ``loss="group"`` each row's residual is split exactly over its groups
(:meth:`RowTargets.group_residuals`), so a group is credited with its own change, not its neighbours' draws:
from a strong prior, where almost every draw is worse, that is the rule that learns (docs/results.md,
``maskpro-bench mask-search``). What a row reward cannot see is how an error grows through later layers; the
block re-fit and fine-tune after the learner correct for that, as they do for SparseGPT's masks.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .oneshot import input_device


class RowTargets:
    """Gram matrices of the dense inputs to every target linear, and each row's error under a drawn mask."""

    def __init__(self, model: nn.Module, modules: list[nn.Linear], rows: torch.Tensor, batch_size: int,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.dense = [m.weight.data.to(self.device, torch.float32, copy=True) for m in modules]
        self.grams, self.gram_of = self._grams(model, modules, rows, batch_size)
        sizes = [m.weight.shape[0] for m in modules]
        self.row_offsets = [0]
        for s in sizes:
            self.row_offsets.append(self.row_offsets[-1] + s)
        self.n_rows = self.row_offsets[-1]
        self.sources: list[torch.Tensor] | None = None

    def _grams(self, model, modules, rows, batch_size) -> tuple[list[torch.Tensor], list[int]]:
        """X^T X of every distinct linear input over all learning rows (q/k/v and gate/up share theirs)."""
        grams: list[torch.Tensor] = []
        gram_of: list[int] = [-1] * len(modules)
        state: dict = {}

        def make_hook(i: int):
            def hook(_mod, args):
                x = args[0]
                if gram_of[i] < 0:  # first batch: a layer reading the very tensor the one before read shares H
                    if state["x"] is not x:
                        grams.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=self.device))
                    gram_of[i] = len(grams) - 1
                if state["index"] != gram_of[i]:
                    flat = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
                    grams[gram_of[i]].addmm_(flat.T, flat)
                state.update(x=x, index=gram_of[i])  # holding x keeps its memory from being reused
            return hook

        handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules)]
        try:
            with torch.no_grad():
                for b in range(0, rows.shape[0] - batch_size + 1, batch_size):
                    state.update(x=None, index=-1)
                    model(input_ids=rows[b:b + batch_size].to(input_device(model)), use_cache=False)
        finally:
            state.clear()
            for h in handles:
                h.remove()
        for g in grams:
            distributed.all_sum_(g)  # every process scores rows on all learning rows, so all draw alike
        return grams, gram_of

    def bind(self, sources: list[torch.Tensor], prior: list[torch.Tensor]) -> None:
        """Fix the weights the learner masks and the prior mask; precompute G, the prior's error and the energy."""
        self.sources = sources
        self.prior = [p.to(self.device, torch.bool, copy=True).reshape(s.shape) for p, s in zip(prior, sources)]
        self.g, energy, base = [], [], []
        for i, (w, s, p) in enumerate(zip(self.dense, sources, self.prior)):
            h = self.grams[self.gram_of[i]]
            e = w - s.float() * p
            g = e @ h
            self.g.append(g)
            base.append((g * e).sum(1))
            energy.append(((w @ h) * w).sum(1).clamp_min(1e-30))
        self.energy = torch.cat(energy)
        self.base = torch.cat(base) / self.energy
        self.dense = None  # G and the energies hold all the learner needs of the dense weights

    def _terms(self, masks: list[torch.Tensor]):
        """Per layer, the elementwise terms -2 D G + D (H D): their row sums are the residuals against the prior."""
        for i, (s, p, m) in enumerate(zip(self.sources, self.prior, masks)):
            d = s.float() * (m.reshape(p.shape).float() - p.float())
            yield i, -2 * d * self.g[i] + (d @ self.grams[self.gram_of[i]]) * d

    @torch.no_grad()
    def losses(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """Relative error of every output row (all layers, in order) under ``masks`` (one per layer)."""
        return self.base + torch.cat([t.sum(1) for _, t in self._terms(masks)]) / self.energy

    @torch.no_grad()
    def group_residuals(self, masks: list[torch.Tensor], m: int) -> torch.Tensor:
        """Each row's residual against the prior split exactly over its groups of ``m`` (all layers, in order).

        Group g's share is d_g . (-2 G + H D)_g: its own change plus half of every pair term it is in, so the
        shares of a row sum to its residual and a group the draw left alone has none.
        """
        energy = self.energy.split([b - a for a, b in zip(self.row_offsets, self.row_offsets[1:])])
        return torch.cat([(t / energy[i].unsqueeze(1)).reshape(-1, m).sum(1) for i, t in self._terms(masks)])

    def state_bytes(self) -> int:
        tensors = [*self.grams, *self.g, *self.prior, self.energy, self.base]
        return sum(t.numel() * t.element_size() for t in tensors)
