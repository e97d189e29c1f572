"""The end-to-end job behind ``maskpro prune``: one-shot methods, MaskPro, and its beyond-the-paper variants.

MaskPro variants (``learn_on`` x ``reconstruct``):
  * paper:                 learn on the dense weights from a one-shot prior mask (``learn_on="dense"``).
  * ``learn_on="sparsegpt"``: learn on SparseGPT's compensated weights (each weight's value when its group
    was decided), starting from SparseGPT's mask, so the search starts where SparseGPT ends.
  * ``learn_on="sparsegpt-block"``: the same, after SparseGPT's kept weights were re-fitted block by block
    (``maskpro.block_recon``); pruned entries keep their decided values, so a flip has a value to bring in.
After any method, with its mask fixed, the kept weights can be re-fitted (``reconstruct``):
  * ``"obs"``:   SparseGPT's OBS solver, layer by layer, from the dense weights;
  * ``"exact"``: the same layer by layer, with each row's kept weights the least-squares fit for its mask;
  * ``"block"``: each decoder block trained to reproduce the dense block's output (``maskpro.block_recon``),
    starting from the method's own kept weights.
Last, ``finetune.steps > 0`` trains the kept weights of the whole model against the dense model
(``maskpro.finetune``), on C4 windows and optionally text the dense model wrote (``maskpro.selfgen``).

Under ``torchrun`` every rank runs the same job on its own replica: the one-shot prior splits its
calibration over the ranks and the learner its minibatches (see ``maskpro.distributed``), and every rank
ends with the same pruned model. With ``learner.memory="lean"`` the dense copy kept for the kd teacher and
``--reconstruct`` waits in host memory, so the GPUs hold only the model and the logits.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import data, distributed
from .block_recon import BlockReconConfig, reconstruct_blocks
from .finetune import FinetuneConfig, SparseFinetuner
from .checkpoint import load_cached, load_tensors, save_tensors
from .errors import MaskproError
from .learner import LearnerConfig, MaskProLearner
from .models import find_linears
from .nm import NM, pack_mask, unpack_mask
from .oneshot import METHODS, PruneResult, calibrated_prune, prune
from .phases import Phases
from .selfgen import self_generated_rows
from .sparsegpt import check_exact_inputs

log = logging.getLogger(__name__)

ALL_METHODS = METHODS + ("maskpro",)
RECONSTRUCT = ("none", "obs", "exact", "block")
LEARN_ON = ("dense", "sparsegpt", "sparsegpt-block")


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
    nm: NM = NM(2, 4)                # a string such as "2:4" is parsed on construction; the learner's follows
    targets: list[str] | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    # MaskPro only:
    init: str = "sparsegpt"          # one-shot method giving the prior mask
    learn_on: str = "dense"          # "dense" (paper), "sparsegpt" (its compensated weights) or
                                     # "sparsegpt-block" (those, kept ones re-fitted block by block first)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # Any method: re-fit the kept weights for the final mask ("none", "obs", "exact" or "block").
    reconstruct: str = "none"
    block: BlockReconConfig = field(default_factory=BlockReconConfig)
    # Any method, last: sparse fine-tuning of the kept weights with the dense model as teacher.
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ft_seq_len: int = 256            # fine-tuning rows: every window of this length of every calibration doc
    self_gen_rows: int = 0           # plus this many rows of text sampled from the dense model
    seq_len: int = 128               # learner minibatch rows: the first n_docs C4 docs longer than this
    n_docs: int = 512                # 0: every calibration document
    windows_per_doc: int = 1         # >1: more 128-token rows per document (more data, less cycling)
    data_root: str | None = None
    calib_file: str | None = None

    def __post_init__(self) -> None:
        self.nm = NM.parse(self.nm)
        if self.learner.nm != self.nm:  # one pattern per job: the learner gets a copy with the job's
            self.learner = replace(self.learner, nm=self.nm)
        self.validate()

    def validate(self) -> None:
        """Check the method, prior and settings before any model is loaded (one-line errors)."""
        if self.method not in ALL_METHODS:
            raise MaskproError(f"unknown method {self.method!r}; choose from {', '.join(ALL_METHODS)}")
        if self.method == "maskpro" and self.init not in METHODS:
            raise MaskproError(f"unknown --init {self.init!r}; the prior mask comes from {', '.join(METHODS)}")
        if self.reconstruct not in RECONSTRUCT:
            raise MaskproError(f"unknown --reconstruct {self.reconstruct!r}; choose from {', '.join(RECONSTRUCT)}")
        if self.learn_on not in LEARN_ON:
            raise MaskproError(f"unknown --learn-on {self.learn_on!r}; choose from {', '.join(LEARN_ON)}")
        if self.reconstruct == "block" or (self.method == "maskpro" and self.learn_on == "sparsegpt-block"):
            self.block.validate()  # before SparseGPT runs, not after
        if self.method == "maskpro" and self.learn_on != "dense" and self.init != "sparsegpt":
            raise MaskproError(f"--learn-on {self.learn_on} needs --init sparsegpt (it learns on SparseGPT's "
                               "weights)")
        learner, calib = self.learner, self.calib
        positive = {"--calib-samples": calib.n_samples, "--calib-seq-len": calib.seq_len, "--steps": learner.steps,
                    "--batch-size": learner.batch_size, "--seq-len": self.seq_len,
                    "--windows-per-doc": self.windows_per_doc, "--checkpoint-every": learner.checkpoint_every}
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise MaskproError(f"{flag} must be >= 1, got {value}")
        self.finetune.validate()
        if self.ft_seq_len < 2 or self.self_gen_rows < 0:
            raise MaskproError(f"--ft-seq-len must be >= 2 and --self-gen-rows >= 0, got {self.ft_seq_len} and "
                               f"{self.self_gen_rows}")
        if self.n_docs is not None and self.n_docs < 0:
            raise MaskproError(f"--n-docs must be >= 0 (0: every document), got {self.n_docs}")
        if not learner.lr > 0 or not learner.scale > 0:
            raise MaskproError(f"--lr and --scale must be > 0, got {learner.lr} and {learner.scale}")
        if not 0 <= learner.ema < 1:
            raise MaskproError(f"--ema must be in [0, 1), got {learner.ema}")
        if learner.nm != self.nm:
            raise MaskproError(f"the learner's pattern {learner.nm} is not the job's {self.nm}; build the job "
                               "with the learner config it should use")


@dataclass
class PruneOutcome:
    masks: dict[str, torch.Tensor]
    info: dict


def validate_job(job: PruneJob) -> NM:
    """Check the job before any model is loaded (one-line errors); returns its pattern."""
    job.validate()
    return job.nm


def run_prune(model, tokenizer, job: PruneJob, workdir: str | Path | None = None, resume: bool = True,
              progress: bool = True) -> PruneOutcome:
    """Prune ``model`` in place as ``job`` says; returns the masks and a record of what was done."""
    nm = validate_job(job)
    progress = progress and distributed.is_main()
    layers = find_linears(model, job.targets)
    if job.reconstruct == "exact":  # refused now, not after the learner's hours
        for n, m in layers.items():
            check_exact_inputs(m.in_features, n)
    lean = job.learner.memory == "lean"
    info: dict = {"targets_glob": job.targets, "nm": str(nm)}
    t0 = time.perf_counter()

    def calib() -> torch.Tensor:
        c = job.calib
        info["calibration"] = {"dataset": "c4", "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed}
        return data.calibration_windows(tokenizer, c.n_samples, c.seq_len, c.seed, job.data_root, job.calib_file)

    refit = job.reconstruct != "none"
    tune = job.finetune.steps > 0
    # Dense weights: MaskPro's teacher and source, what a re-fit starts from or aims at, the fine-tune's teacher.
    dense = {n: m.weight.data.to("cpu", copy=True) if lean else m.weight.data.clone() for n, m in layers.items()} \
        if job.method == "maskpro" or refit or tune else {}
    # The fine-tune's text is read now (seconds), so a batch it cannot fill fails before the long phases run.
    ft_rows = finetune_rows(tokenizer, job) if tune else None
    one_shot = job.init if job.method == "maskpro" else job.method
    phase = Phases(phase_names(job))
    windows = None
    if refit or one_shot != "magnitude":
        with phase("calibration windows"):
            windows = calib()
    if job.method != "maskpro":
        with phase(f"one-shot {job.method}"):
            masks = prune(model, job.method, nm, windows, job.targets, batch=job.calib.batch,
                          progress=progress).masks
    else:
        masks = _learn(model, tokenizer, job, nm, layers, dense, windows, workdir, resume, progress, info, t0,
                       phase)
    if refit:
        t1 = time.perf_counter()
        with phase(f"re-fit of the kept weights ({job.reconstruct})"):
            info["reconstructed"] = reconstruct(model, job, nm, dense, masks, windows, progress)
        info["reconstruct_s"] = time.perf_counter() - t1
    if tune:
        info["finetune"] = finetune(model, job, layers, dense, masks, ft_rows, workdir, resume, progress, phase)
    info["prune_s"] = time.perf_counter() - t0
    return PruneOutcome(masks, info)


def phase_names(job: PruneJob) -> list[str]:
    """The phases ``run_prune`` goes through for ``job``, in order."""
    one_shot = job.init if job.method == "maskpro" else job.method
    names = ["calibration windows"] if job.reconstruct != "none" or one_shot != "magnitude" else []
    if job.method != "maskpro":
        names.append(f"one-shot {job.method}")
    else:
        names.append(f"prior mask ({job.init})")
        if job.learn_on == "sparsegpt-block":
            names.append("block re-fit before learning")
        names.append(f"MaskPro learner ({job.learner.steps} steps)")
    if job.reconstruct != "none":
        names.append(f"re-fit of the kept weights ({job.reconstruct})")
    if job.finetune.steps:
        if job.self_gen_rows:
            names.append(f"self-generated text ({job.self_gen_rows} rows)")
        names.append(f"sparse fine-tune ({job.finetune.steps} steps)")
    return names


def finetune_rows(tokenizer, job: PruneJob) -> torch.Tensor:
    """Every ``ft_seq_len`` window of every calibration document, shuffled; a one-line error when these and the
    self-generated rows together cannot fill one fine-tune batch."""
    rows = data.learning_batches(tokenizer, 0, job.ft_seq_len, job.data_root, job.calib_file, 10 ** 9,
                                 job.finetune.seed)
    if rows.shape[0] + job.self_gen_rows < job.finetune.batch_size:
        raise MaskproError(f"{rows.shape[0]} fine-tune rows of {job.ft_seq_len} tokens (plus {job.self_gen_rows} "
                           f"self-generated) are fewer than --ft-batch-size {job.finetune.batch_size}; lower it "
                           "or --ft-seq-len, or add --self-gen-rows")
    return rows


def finetune(model, job: PruneJob, layers: dict, dense: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
             rows: torch.Tensor, workdir, resume: bool, progress: bool, phase: Phases) -> dict:
    """Sparse fine-tuning of ``model``'s kept weights on ``rows`` (and self-generated text) with a dense copy as
    teacher; returns its report."""
    teacher = copy.deepcopy(model)
    for n, m in find_linears(teacher, list(layers)).items():
        m.weight.data = dense[n].to(m.weight.device, m.weight.dtype)
    sources = {"c4_rows": int(rows.shape[0])}
    if job.self_gen_rows:
        with phase(f"self-generated text ({job.self_gen_rows} rows)"):
            t = time.perf_counter()
            made = self_generated_rows(teacher, rows, job.self_gen_rows, job.ft_seq_len, seed=job.finetune.seed,
                                       workdir=workdir if distributed.is_main() else None,
                                       key={"model": str(getattr(model.config, "_name_or_path", ""))},
                                       progress=progress)
        sources.update(self_generated_rows=int(made.shape[0]), self_generation_s=time.perf_counter() - t)
        rows = torch.cat([rows, made])
    with phase(f"sparse fine-tune ({job.finetune.steps} steps)"):
        tuner = SparseFinetuner(model, teacher, layers, masks, rows, job.finetune, workdir, progress)
        report = tuner.run(resume=resume)
    del teacher
    return {**report, "data": sources}


def reconstruct(model, job: PruneJob, nm: NM, dense: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                windows: torch.Tensor, progress: bool = True) -> dict:
    """Re-fit the kept weights of ``model`` for ``masks`` as ``job.reconstruct`` says; returns what was done."""
    if job.reconstruct in ("obs", "exact"):  # from the dense weights, layer by layer
        for n, m in find_linears(model, list(masks)).items():
            m.weight.data = dense[n].to(m.weight.device)
        calibrated_prune(model, windows, nm, "sparsegpt", job.targets, batch=job.calib.batch, fixed_masks=masks,
                         progress=progress, exact=job.reconstruct == "exact")
        return {"method": "sparsegpt-obs" if job.reconstruct == "obs" else "least-squares"}
    if distributed.current().distributed:
        log.info("block reconstruction: every process fits the same blocks on the whole calibration set")
    return reconstruct_blocks(model, dense, masks, windows, job.block, batch=job.calib.batch, progress=progress)


def _learn(model, tokenizer, job: PruneJob, nm: NM, layers: dict, dense: dict[str, torch.Tensor],
           windows: torch.Tensor | None, workdir, resume: bool, progress: bool, info: dict,
           t0: float, phase: Phases) -> dict[str, torch.Tensor]:
    """MaskPro: a prior from a one-shot method, then the learner; the model ends with the learned masks."""
    lean = job.learner.memory == "lean"
    device = next(model.parameters()).device
    if resume:  # a checkpoint of other settings is refused now, not after the prior was computed again
        MaskProLearner.check_resumable(workdir, job.learner, list(layers))
    with phase(f"prior mask ({job.init})"):
        prior = _prior(model, job, nm, layers, windows, workdir, resume, progress)
    info["init"] = job.init
    info["init_s"] = time.perf_counter() - t0
    source = dense
    if job.learn_on != "dense":
        source = {n: prior.decided[n] if lean else prior.decided[n].to(device) for n in layers}
    if job.learn_on == "sparsegpt-block":
        with phase("block re-fit before learning"):
            source = _refitted_source(model, job, layers, dense, prior.masks, source, windows, workdir, resume,
                                      progress, info)
    for n, m in layers.items():  # the modules hold the dense model (the kd teacher); the learner masks `source`
        m.weight.data = dense[n].to(m.weight.device)
    batches = data.learning_batches(tokenizer, job.n_docs, job.seq_len, job.data_root, job.calib_file,
                                    job.windows_per_doc, job.learner.seed)
    info["learning_data"] = {"dataset": "c4", "n_docs": job.n_docs, "seq_len": job.seq_len,
                             "windows_per_doc": job.windows_per_doc, "rows": int(batches.shape[0])}
    learner = MaskProLearner(model, layers, prior.masks, batches, job.learner, workdir, weights=source,
                             progress=progress)
    with phase(f"MaskPro learner ({job.learner.steps} steps)"):
        result = learner.run(resume=resume)
    learner.finish(result.masks)
    info["learner"] = {**job.learner.fingerprint(), "steps": result.steps, "wall_s": result.wall_s,
                       "ms_per_step": result.ms_per_step, "learn_on": job.learn_on, "memory": job.learner.memory,
                       "processes": distributed.current().world_size,
                       "baseline_loss": result.baseline_loss, "final_loss": result.final_loss,
                       "skipped_steps": result.skipped_steps,
                       "final_residual_ema": sum(result.residuals[-50:]) / max(1, len(result.residuals[-50:]))}
    changed = sum(int((result.masks[n] != prior.masks[n]).sum()) for n in layers)
    info["learner"]["changed_fraction"] = changed / sum(m.numel() for m in result.masks.values())
    return result.masks


PRIOR = "prior.safetensors"
REFIT_SOURCE = "refit-source.safetensors"


def _prior_key(job: PruneJob, nm: NM, model, layers: dict) -> dict:
    """What the one-shot prior depends on, the model included: a cached prior is used only when all matches."""
    weight = next(iter(layers.values())).weight
    return {"model": str(getattr(model.config, "_name_or_path", "")), "dtype": str(weight.dtype),
            "layers": sorted(layers), "init": job.init, "nm": str(nm), "calib": asdict(job.calib),
            "targets": job.targets, "calib_file": job.calib_file, "decided": job.learn_on != "dense"}


def _prior(model, job: PruneJob, nm: NM, layers: dict, windows, workdir, resume: bool,
           progress: bool) -> PruneResult:
    """The one-shot prior (masks, and SparseGPT's decided weights when learning on them), cached in the work
    directory so a resumed run does not compute it again (SparseGPT: minutes on a GPU, about half an hour on
    a CPU). The model's target layers end as the one-shot method left them."""
    path = Path(workdir) / PRIOR if workdir else None
    key = _prior_key(job, nm, model, layers)
    hit = load_cached(path, key) if resume else None
    if hit is not None:
        tensors, meta = hit
        masks = {n: unpack_mask(tensors[f"mask.{n}"], tuple(meta["shapes"][n])) for n in layers}
        decided = {n: tensors[f"decided.{n}"] for n in layers} if key["decided"] else {}
        for n, m in layers.items():  # SparseGPT's kept weights are their decided values
            w = decided[n] if decided else m.weight.data
            keep = masks[n].to(m.weight.device)
            m.weight.data = w.to(m.weight.device, m.weight.dtype) * keep
        log.info("prior mask (%s): %s, computed by an earlier run with the same settings", job.init, path)
        return PruneResult(masks, decided)
    prior = prune(model, job.init, nm, windows, job.targets, batch=job.calib.batch,
                  keep_decided=key["decided"], progress=progress)
    if path is not None and distributed.is_main():
        packed = {f"mask.{n}": pack_mask(prior.masks[n].cpu())[0] for n in layers}
        save_tensors({**packed, **{f"decided.{n}": prior.decided[n] for n in prior.decided}}, path,
                     {"key": key, "shapes": {n: list(prior.masks[n].shape) for n in layers}})
    distributed.barrier()
    return prior


def _refitted_source(model, job: PruneJob, layers: dict, dense: dict[str, torch.Tensor],
                     masks: dict[str, torch.Tensor], decided: dict[str, torch.Tensor], windows: torch.Tensor,
                     workdir, resume: bool, progress: bool, info: dict) -> dict[str, torch.Tensor]:
    """SparseGPT's kept weights re-fitted block by block, its decided values elsewhere: what MaskPro learns on.

    Saved in the work directory before learning starts, so a resumed run learns on exactly the same weights
    (a GPU re-fit is not bit-for-bit repeatable) without re-fitting again."""
    cached = Path(workdir) / REFIT_SOURCE if workdir else None
    key = {"block": asdict(job.block), "prior": _prior_key(job, job.nm, model, layers)}
    hit = load_cached(cached, key) if resume else None
    if hit is not None and set(hit[0]) == set(layers):
        tensors, meta = hit
        log.info("re-fitted weights to learn on: %s, computed by an earlier run with the same settings", cached)
        info["refit_before_learning"] = meta["report"]
        return {n: tensors[n].to(decided[n].device, decided[n].dtype) for n in layers}
    info["refit_before_learning"] = reconstruct_blocks(model, dense, masks, windows, job.block,
                                                       batch=job.calib.batch, progress=progress)
    source = {}
    for n, m in layers.items():  # re-fitted kept values; pruned entries keep their decided values
        keep = masks[n].to(decided[n].device)
        source[n] = torch.where(keep, m.weight.data.to(decided[n].device), decided[n])
    if cached is not None and distributed.is_main():
        save_tensors(source, cached, {"key": key, "report": info["refit_before_learning"]})
    distributed.barrier()
    if cached is not None and not distributed.is_main():  # every rank learns on rank 0's bits
        source = {n: t.to(decided[n].device, decided[n].dtype) for n, t in load_tensors(cached)[0].items()}
    return source


def method_label(job: PruneJob) -> str:
    """A short name for reports: maskpro, maskpro+recon, maskpro@sparsegpt+block, sparsegpt+block, ..."""
    label = job.method
    if job.method == "maskpro" and job.learn_on != "dense":
        label = f"maskpro@{job.learn_on}"
    return label + RECON_SUFFIX[job.reconstruct] + ("+ft" if job.finetune.steps else "")


RECON_SUFFIX = {"none": "", "obs": "+recon", "exact": "+exact", "block": "+block"}
