"""The MaskPro learner's checkpoint: logits and residual statistics, written atomically, refused if stale.

A checkpoint records the step and a fingerprint of everything that changes the result (the settings, the
target layers, the prior mask's and the learning rows' digests), so a resumed run either draws exactly the
masks an uninterrupted one would or stops with a one-line error naming what differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import distributed
from .checkpoint import load_tensors, read_tensor_meta, save_tensors
from .errors import MaskproError
from .integrity import check_safetensors

log = logging.getLogger(__name__)

CHECKPOINT = "learner-state.safetensors"


class Checkpointed:
    """Save and resume for :class:`maskpro.learner.MaskProLearner` (uses its mode, statistics and digests)."""

    def _meta(self) -> dict:
        return {"step": self.step, "config": self.cfg.fingerprint(), "layers": self.names,
                "prior": self.prior_digest, "data": self.data_digest}

    def logits(self) -> dict[str, torch.Tensor]:
        """The logits by checkpoint key (the mode decides the keys)."""
        return self.mode.logits()

    def save_checkpoint(self) -> None:
        """Rank 0 writes (atomically); the others wait, so every rank resumes from the same file."""
        if self.workdir is None:
            return
        if self.group.is_main:
            save_tensors({**self.logits(), "base": self.base, "delta": self.delta, "var": self.var,
                          "residuals": self.residuals[: self.step], "losses": self.losses[: self.step]},
                         self.workdir / CHECKPOINT, self._meta())
        distributed.barrier()

    @staticmethod
    def check_resumable(workdir, cfg, names: list[str]) -> None:
        """Refuse, before any prior is computed, a checkpoint that another configuration wrote."""
        path = Path(workdir) / CHECKPOINT if workdir else None
        if path is None or not path.is_file():
            return
        check_safetensors(path)
        meta = read_tensor_meta(path)
        for key, mine in (("config", cfg.fingerprint()), ("layers", names)):
            if meta.get(key) != mine:
                raise MaskproError(f"the checkpoint in {workdir} was made with different {key} "
                                   f"({meta.get(key)} vs {mine}); use a new --workdir or pass --restart")
        if int(meta.get("step", 0)) > cfg.steps:
            raise MaskproError(f"the checkpoint in {workdir} is at step {meta['step']}, past --steps {cfg.steps}; "
                               "raise --steps or use a new --workdir")

    def try_resume(self) -> bool:
        """Continue from the work directory's checkpoint if it was made by the same settings."""
        if self.workdir is None or not (self.workdir / CHECKPOINT).is_file():
            return False
        tensors, meta = load_tensors(self.workdir / CHECKPOINT)
        mine = self._meta()
        for key in ("config", "layers", "prior", "data"):
            if meta.get(key) != mine[key]:
                raise MaskproError(f"the checkpoint in {self.workdir} was made with different {key} "
                                   f"({meta.get(key)} vs {mine[key]}); use a new --workdir or pass --restart")
        step = int(meta["step"])
        if step > self.cfg.steps:
            raise MaskproError(f"the checkpoint in {self.workdir} is at step {step}, past --steps {self.cfg.steps}; "
                               "raise --steps or use a new --workdir")
        for key, theta in self.logits().items():
            theta.copy_(tensors[key].view(theta.shape))
        self.base.copy_(tensors["base"])
        self.delta.copy_(tensors["delta"])
        self.var.copy_(tensors.get("var", self.var))  # checkpoints from before normalize have none (all zero)
        self.residuals[:step] = tensors["residuals"].to(self.device)
        self.losses[:step] = tensors["losses"].to(self.device)
        self.step = step
        log.info("resumed from %s at step %d", self.workdir / CHECKPOINT, step)
        return True
