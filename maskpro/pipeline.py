"""The end-to-end job behind ``maskpro prune``: one-shot methods, MaskPro, and its beyond-the-paper variants.

MaskPro variants (``learn_on`` x ``reconstruct``):
  * paper:                 learn on the dense weights from a one-shot prior mask (``learn_on="dense"``).
  * ``reconstruct=True``:  afterwards, SparseGPT's OBS solver re-fits the kept weights for the learned mask.
  * ``learn_on="sparsegpt"``: learn on SparseGPT's compensated weights (each weight's value when its group
    was decided), starting from SparseGPT's mask, so the search starts where SparseGPT ends.

Under ``torchrun`` every rank runs the same job on its own replica: the one-shot prior splits its
calibration over the ranks and the learner its minibatches (see ``maskpro.distributed``), and every rank
ends with the same pruned model. With ``learner.memory="lean"`` the dense copy kept for the kd teacher and
``--reconstruct`` waits in host memory, so the GPUs hold only the model and the logits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, distributed
from .errors import MaskproError
from .learner import LearnerConfig, MaskProLearner
from .models import find_linears
from .nm import NM
from .oneshot import METHODS, calibrated_prune, prune

log = logging.getLogger(__name__)

ALL_METHODS = METHODS + ("maskpro",)


@dataclass
class CalibConfig:
    """SparseGPT/Wanda calibration: random windows of C4 documents."""

    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch: int = 8


@dataclass
class PruneJob:
    method: str = "maskpro"
    nm: str = "2:4"
    targets: list[str] | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    # MaskPro only:
    init: str = "sparsegpt"          # one-shot method giving the prior mask
    learn_on: str = "dense"          # "dense" (paper) or "sparsegpt" (its compensated weights)
    reconstruct: bool = False        # OBS re-fit of the kept weights after learning
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    seq_len: int = 128               # learner minibatch rows: the first n_docs C4 docs longer than this
    n_docs: int = 512                # 0: every calibration document
    windows_per_doc: int = 1         # >1: more 128-token rows per document (more data, less cycling)
    data_root: str | None = None
    calib_file: str | None = None


@dataclass
class PruneOutcome:
    masks: dict[str, torch.Tensor]
    info: dict


def validate_job(job: PruneJob) -> NM:
    """Check the job's method, prior and pattern before any model is loaded (one-line errors)."""
    if job.method not in ALL_METHODS:
        raise MaskproError(f"unknown method {job.method!r}; choose from {', '.join(ALL_METHODS)}")
    if job.method == "maskpro" and job.init not in METHODS:
        raise MaskproError(f"unknown --init {job.init!r}; the prior mask comes from {', '.join(METHODS)}")
    if job.learn_on not in ("dense", "sparsegpt"):
        raise MaskproError(f"unknown --learn-on {job.learn_on!r}; choose dense or sparsegpt")
    nm = NM.parse(job.nm)
    if job.learner.nm != job.nm:
        job.learner.nm = job.nm
    return nm


def run_prune(model, tokenizer, job: PruneJob, workdir: str | Path | None = None, resume: bool = True,
              progress: bool = True) -> PruneOutcome:
    """Prune ``model`` in place as ``job`` says; returns the masks and a record of what was done."""
    nm = validate_job(job)
    progress = progress and distributed.is_main()
    layers = find_linears(model, job.targets)
    device = next(model.parameters()).device
    lean = job.learner.memory == "lean"
    info: dict = {"targets_glob": job.targets, "nm": str(nm)}
    t0 = time.perf_counter()

    def calib() -> torch.Tensor:
        c = job.calib
        info["calibration"] = {"dataset": "c4", "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed}
        return data.calibration_windows(tokenizer, c.n_samples, c.seq_len, c.seed, job.data_root, job.calib_file)

    if job.method != "maskpro":
        res = prune(model, job.method, nm, calib if job.method != "magnitude" else None, job.targets,
                    batch=job.calib.batch, progress=progress)
        info["prune_s"] = time.perf_counter() - t0
        return PruneOutcome(res.masks, info)

    # MaskPro: prior from a one-shot method on a copy of the dense weights.
    dense = {n: m.weight.data.to("cpu", copy=True) if lean else m.weight.data.clone() for n, m in layers.items()}
    windows = calib() if job.init != "magnitude" or job.reconstruct else None
    prior = prune(model, job.init, nm, windows, job.targets, batch=job.calib.batch,
                  keep_decided=job.learn_on == "sparsegpt", progress=progress)
    info["init"] = job.init
    info["init_s"] = time.perf_counter() - t0
    if job.learn_on == "sparsegpt":
        if job.init != "sparsegpt":
            raise MaskproError("--learn-on sparsegpt needs --init sparsegpt (it learns on SparseGPT's weights)")
        source = {n: prior.decided[n] if lean else prior.decided[n].to(device) for n in layers}
    else:
        source = dense
    for n, m in layers.items():  # the modules hold the dense model (the kd teacher); the learner masks `source`
        m.weight.data = dense[n].to(m.weight.device)
    batches = data.learning_batches(tokenizer, job.n_docs, job.seq_len, job.data_root, job.calib_file,
                                    job.windows_per_doc, job.learner.seed)
    info["learning_data"] = {"dataset": "c4", "n_docs": job.n_docs, "seq_len": job.seq_len,
                             "windows_per_doc": job.windows_per_doc, "rows": int(batches.shape[0])}
    learner = MaskProLearner(model, layers, prior.masks, batches, job.learner, workdir, weights=source,
                             progress=progress)
    result = learner.run(resume=resume)
    learner.finish(result.masks)
    info["learner"] = {**job.learner.fingerprint(), "steps": result.steps, "wall_s": result.wall_s,
                       "ms_per_step": result.ms_per_step, "learn_on": job.learn_on, "memory": job.learner.memory,
                       "processes": distributed.current().world_size,
                       "baseline_loss": result.baseline_loss, "skipped_steps": result.skipped_steps,
                       "final_residual_ema": sum(result.residuals[-50:]) / max(1, len(result.residuals[-50:]))}
    changed = sum(int((result.masks[n] != prior.masks[n]).sum()) for n in layers)
    info["learner"]["changed_fraction"] = changed / sum(m.numel() for m in result.masks.values())
    if job.reconstruct:
        for n, m in layers.items():
            m.weight.data = dense[n].to(m.weight.device)
        calibrated_prune(model, windows, nm, "sparsegpt", job.targets, batch=job.calib.batch,
                         fixed_masks=result.masks, progress=progress)
        info["reconstructed"] = "sparsegpt-obs"
    info["prune_s"] = time.perf_counter() - t0
    return PruneOutcome(result.masks, info)


def method_label(job: PruneJob) -> str:
    """A short name for reports: maskpro, maskpro+recon, maskpro@sparsegpt, ..."""
    if job.method != "maskpro":
        return job.method
    label = "maskpro" if job.learn_on == "dense" else "maskpro@sparsegpt"
    return label + ("+recon" if job.reconstruct else "")
