"""The MaskPro learner: policy-gradient mask learning with forward passes only.

Each step draws one N:M mask per group from the current logits, runs one forward pass on a minibatch, and
moves the logits along the exact score function of the drawn subsets, weighted by the *residual*
``loss(sampled mask) - loss(initial mask)`` on the same minibatch minus a moving average of that residual
(the variance reduction of the MaskPro paper, arXiv 2506.12876).

What makes it fast: sampling, masking and the update are a few whole-model tensor ops (the memory modes of
``maskpro.learner_modes``); the initial mask's loss of each fixed minibatch is computed once; the residual
tracker stays on the device (no host sync per step); on CUDA the forward pass is replayed from a CUDA graph.
Randomness is keyed by (seed, step), so a resumed run draws exactly the masks an uninterrupted one would.

Scaling out (see ``maskpro.distributed``): under ``torchrun`` every rank holds a replica, draws the same
masks from the same keys, runs its own rows of each global minibatch, and the ranks agree on the minibatch
loss with one all-reduce of a scalar per step, so the logits stay identical without being sent.
``memory="lean"`` keeps only the model's own weights plus 4 B of logits per weight, on each layer's own
device, for models that accelerate's ``device_map`` spreads over several GPUs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from . import nm as nmlib
from .advantage import advantage_
from .checkpoint import tensor_digest
from .errors import MaskproError
from .learner_checkpoint import CHECKPOINT, Checkpointed  # noqa: F401 (CHECKPOINT: part of this API)
from .learner_modes import MODES
from .local_reward import BlockTargets
from .nm import NM
from .row_reward import RowTargets

log = logging.getLogger(__name__)


@dataclass
class LearnerConfig:
    """Hyper-parameters of a MaskPro run (defaults: the paper's settings for LLMs)."""

    nm: NM = NM(2, 4)           # a string such as "2:4" is parsed on construction
    steps: int = 1000
    lr: float = 50.0            # step size on the logits
    lr_schedule: str = "linear"  # "linear" decays lr to 0 at the last step (settles the policy); or "constant"
    scale: float = 10.0         # initial logits = prior mask * scale
    batch_size: int = 32
    ema: float = 0.99           # moving average of the residual (baseline)
    loss: str = "ce"            # "ce": LM loss on the data (paper); "kd": soft cross-entropy against the
                                # next-token distribution of the model's weights at construction (the dense model);
                                # "local": one reward per decoder block (maskpro.local_reward); "row": one
                                # per output row of every linear, no forward pass (maskpro.row_reward);
                                # "group": each row's reward split exactly over its groups
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    cuda_graph: bool = True     # replay the forward pass from a CUDA graph on GPUs (fast memory mode only)
    compile: bool = True        # fuse sampling and the update on GPUs (torch.compile; Triton kernels in lean mode)
    memory: str = "fast"        # "fast": flat buffers, 13 B per weight in fp16; "lean": the model's own weights
                                # plus 4 B of logits per weight, masks redrawn per layer (works with device_map)
    normalize: bool = False     # divide the centred residual by its running RMS (maskpro.advantage)
    micro_batch: int = 0        # rows per forward pass (0: the whole batch of this process); the step loss is
                                # the mean over micro-batches, so only float rounding depends on it

    def __post_init__(self) -> None:
        self.nm = NM.parse(self.nm)
        self.validate()

    def validate(self) -> None:
        """One-line errors for settings the learner cannot run."""
        if self.lr_schedule not in ("linear", "constant"):
            raise MaskproError(f"unknown lr schedule {self.lr_schedule!r}; use linear or constant")
        if self.loss not in ("ce", "kd", "local", "row", "group"):
            raise MaskproError(f"unknown learner loss {self.loss!r}; use ce, kd, local, row or group")
        if self.loss in ("row", "group") and self.memory != "fast":
            raise MaskproError(f"--loss {self.loss} scores rows from the fast mode's flat buffers; use --memory fast")
        if self.memory not in MODES:
            raise MaskproError(f"unknown learner memory mode {self.memory!r}; use {' or '.join(MODES)}")
        if self.memory == "lean" and not self.scale > 0:
            raise MaskproError(f"lean memory mode needs --scale > 0 (the prior is read back from the logits), "
                               f"got {self.scale}")

    # Settings that change the result; the others (steps, logging, graphs, micro-batches) may differ on resume.
    def fingerprint(self) -> dict:
        d = asdict(self)
        d["nm"] = str(self.nm)  # checkpoints record the pattern as "N:M"
        for k in ("steps", "checkpoint_every", "log_every", "cuda_graph", "compile", "micro_batch"):
            d.pop(k)
        for key, default in (("memory", "fast"), ("normalize", False)):
            if d[key] == default:  # defaults are left out, so fingerprints match those that predate the option
                d.pop(key)
        return d


@dataclass
class LearnResult:
    masks: dict[str, torch.Tensor]
    steps: int
    wall_s: float
    ms_per_step: float
    residuals: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    baseline_loss: float = float("nan")
    skipped_steps: int = 0      # steps whose loss was not finite (no update was made)
    final_loss: float | None = None  # row/group: the final mask's mean relative row error (baseline_loss: prior's)


class MaskProLearner(Checkpointed):
    """Learns N:M masks for ``layers`` of ``model`` from ``prior`` masks on fixed token ``batches``.

    ``weights`` optionally replaces the dense weights the masks are applied to (e.g. SparseGPT's
    reconstructed values); by default the model's current weights are used. Where the logits live and how
    masks are drawn is the memory mode's business (:mod:`maskpro.learner_modes`); this class is the loop.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Linear], prior: dict[str, torch.Tensor],
                 batches: torch.Tensor, config: LearnerConfig, workdir: str | Path | None = None,
                 weights: dict[str, torch.Tensor] | None = None, progress: bool = True):
        self.model, self.cfg, self.progress = model, config, progress
        config.validate()  # the config may have been edited since it was built
        self.nm = config.nm
        self.workdir = Path(workdir) if workdir else None
        if batches.dim() != 2 or batches.shape[0] < config.batch_size:
            raise MaskproError(f"need at least batch_size={config.batch_size} token rows to learn from, "
                               f"got {tuple(batches.shape)}; lower --batch-size or add data")
        missing = [n for n in layers if n not in prior]
        if missing:
            raise MaskproError(f"no initial mask for layer {missing[0]}; the prior must cover every target layer")
        self.names = list(layers)
        self.modules = [layers[n] for n in self.names]
        self.group = distributed.current()
        self.bs, self.micro, self.n_micro = self._batch_split(config)
        mode = MODES[config.memory]
        self.device = mode.home_device(model, self.modules)
        for n, m in zip(self.names, self.modules):
            nmlib.check_shape(m.weight.shape, self.nm, n)
        self._check_prior(prior)
        self.prior_digest = tensor_digest(*(prior[n].reshape(-1).bool() for n in self.names))
        self._set_rows(batches)
        # The teacher is the model as it is now, before the mode swaps in the source weights.
        self.teacher = self._teacher_probs([m.weight.data for m in self.modules]) if config.loss == "kd" else None
        self.local = (BlockTargets(model, self.modules, self.batches, self.bs, self.device)
                      if config.loss == "local" else None)
        self.rows = (RowTargets(model, self.modules, self.batches, self.bs, self.device)
                     if config.loss in ("row", "group") else None)
        self.mode = mode(self.nm, self.names, self.modules, prior, weights, device=self.device, seed=config.seed,
                         scale=config.scale, compile=config.compile)
        if self.rows is not None:
            self.rows.bind(self.mode.layer_views(self.mode.w0), self.mode.layer_views(self.mode.mask))
            self.n_batches = 1  # the rows' Gram matrices hold every learning token: one "minibatch"
        # a residual per block with loss="local", per output row with "row", per group with "group"
        per = ((self.local.n_blocks,) if self.local else (self.rows.n_rows,) if config.loss == "row"
               else (self.mode.theta.numel() // self.nm.m,) if config.loss == "group" else ())
        self.base = torch.zeros(self.n_batches, *per, dtype=torch.float32, device=self.device)
        self.delta = torch.zeros(per, dtype=torch.float32, device=self.device)
        self.var = torch.zeros(per, dtype=torch.float32, device=self.device)  # used with normalize only
        self.residuals = torch.zeros(config.steps, dtype=torch.float32, device=self.device)
        self.losses = torch.zeros(config.steps, dtype=torch.float32, device=self.device)
        self.step = 0
        self._forward = None

    # The fast mode's flat buffers (tests and benchmarks read them); None in lean mode.
    theta = property(lambda self: getattr(self.mode, "theta", None))
    w = property(lambda self: getattr(self.mode, "w", None))
    w0 = property(lambda self: getattr(self.mode, "w0", None))

    def _batch_split(self, cfg: LearnerConfig) -> tuple[int, int, int]:
        """(rows per step on this process, rows per forward pass, forward passes per step over all processes)."""
        local = distributed.local_batch(cfg.batch_size, self.group.world_size)
        micro = cfg.micro_batch or local
        if micro < 1 or local % micro:
            raise MaskproError(f"micro-batch {cfg.micro_batch} does not divide the {local} rows each process runs "
                               f"per step; pick a divisor of {local}")
        return local, micro, cfg.batch_size // micro

    def _check_prior(self, prior: dict[str, torch.Tensor]) -> None:
        """Every group of the prior keeps exactly N (checked before any buffer or module is touched)."""
        for n in self.names:
            if not bool((prior[n].reshape(-1, self.nm.m).bool().sum(1) == self.nm.n).all()):
                raise MaskproError(f"initial mask of {n} is not strict {self.nm}; build it with a one-shot method")

    def _set_rows(self, batches: torch.Tensor) -> None:
        """The learning rows of this process (its share of every global minibatch) and their digest."""
        self.data_digest = tensor_digest(batches)  # of all rows, so every rank and a single process agree
        if self.group.distributed:
            batches = distributed.shard_rows(batches, self.cfg.batch_size, self.group.rank, self.group.world_size)
        self.batches = batches.to(self.device)
        self.n_batches = batches.shape[0] // self.bs

    # ----------------------------------------------------------------------------------------------- model
    @torch.no_grad()
    def _teacher_probs(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Next-token probabilities of every learning row under ``weights`` (rows x seq x vocab, model dtype).

        Kept for the whole run (for SmolLM2, 512 rows of 128 tokens: 6.4 GB in fp16) so a step costs no
        second forward pass.
        """
        live = [m.weight.data for m in self.modules]
        for m, w in zip(self.modules, weights):
            m.weight.data = w
        out = [torch.softmax(self.model(input_ids=self.batch(b), use_cache=False).logits.float(), -1).to(weights[0].dtype)
               for b in range(self.n_batches)]
        for m, w in zip(self.modules, live):
            m.weight.data = w
        return torch.cat(out)

    @torch.no_grad()  # forward only: no autograd graph, no saved activations
    def _loss(self, ids: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss.float()
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1).float())

    def _home_loss(self, ids: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss on the residual tracker's device (a model spread by device_map ends on another GPU)."""
        return self._loss(ids, target).to(self.device)

    def _target(self, b: int) -> torch.Tensor | None:
        bs = self.bs
        return None if self.teacher is None else self.teacher[b * bs:(b + 1) * bs]

    def _make_forward(self):
        """Forward + loss; on CUDA captured once in a graph and replayed (weights and ids are static)."""
        if not self.mode.graphable or self.local is not None or self.rows is not None:  # no whole-model forward
            return self._home_loss
        eager = self._loss
        if self.device.type != "cuda" or not self.cfg.cuda_graph:
            return eager
        static = self.batches[: self.micro].clone()
        target = self._target(0)
        target = None if target is None else target[: self.micro].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                eager(static, target)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = eager(static, target)
        except Exception as exc:  # some models do host syncs in forward; fall back to eager
            log.warning("CUDA graph capture failed (%s); running the forward pass eagerly", exc)
            return eager

        def replay(ids: torch.Tensor, tgt: torch.Tensor | None = None) -> torch.Tensor:
            static.copy_(ids)
            if target is not None:
                target.copy_(tgt)
            graph.replay()
            return out
        return replay

    def batch(self, b: int) -> torch.Tensor:
        bs = self.bs
        return self.batches[b * bs:(b + 1) * bs]

    def _local_loss(self, b: int, fn) -> torch.Tensor:
        """This process's part of minibatch ``b``: the sum of its micro-batch losses (one term by default)."""
        ids, tgt = self.batch(b), self._target(b)
        if self.local is not None:  # whole batches: the dense block states were captured per batch
            return self.local.losses(b).to(self.device)
        if self.rows is not None:  # every learning row at once, the same on every process
            masks = self.mode.layer_views(self.mode.mask)
            return (self.rows.losses(masks) if self.cfg.loss == "row"
                    else self.rows.group_residuals(masks, self.nm.m))
        if self.micro == self.bs:
            return fn(ids, tgt)
        m = self.micro
        return sum(fn(ids[i:i + m], None if tgt is None else tgt[i:i + m]) for i in range(0, self.bs, m))

    def _global_mean_(self, local: torch.Tensor) -> torch.Tensor:
        """Mean over the micro-batches of all processes, in place: one SUM all-reduce (a scalar per step).

        The sum is exact for two terms, so 2 processes give the same bits as one process running the same
        micro-batches; a NaN or inf on any rank reaches every rank, which then all skip the update.
        """
        if self.rows is not None:  # already computed from all processes' rows
            return local
        if self.group.distributed:
            distributed.all_sum_(local)
        return local if self.n_micro == 1 else local.div_(self.n_micro)

    # ------------------------------------------------------------------------------------------ the method
    @torch.no_grad()
    def compute_baselines(self) -> None:
        """Loss of every fixed minibatch under the initial mask (computed once, reused every epoch)."""
        with self.mode.initial_weights():
            for b in range(self.n_batches):
                self.base[b] = self._local_loss(b, self._home_loss)
        self._global_mean_(self.base)  # one all-reduce of the whole vector

    @torch.no_grad()
    def sample_phase(self) -> None:
        """Draw this step's masks (noise keyed by seed and step) and write the masked weights."""
        self.mode.sample(self.step)

    @torch.no_grad()
    def update_phase(self, loss: torch.Tensor) -> None:
        """Residual against the initial mask on the same minibatch, minus its moving average, times score."""
        t, cfg = self.step, self.cfg
        b = t % self.n_batches
        res = loss - self.base[b]
        adv = advantage_(res, self.delta, self.var, ema=cfg.ema, lr=self.lr_at(t), step=t, normalize=cfg.normalize)
        self.mode.update(adv if self.local is None else adv[self.local.layer_block], t)
        self.residuals[t] = res.mean()
        self.losses[t] = loss.mean()
        self.step = t + 1

    def lr_at(self, t: int) -> float:
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return self.cfg.lr * (1 - t / self.cfg.steps)

    def train_step(self) -> None:
        self.sample_phase()
        b = self.step % self.n_batches
        loss = self._global_mean_(self._local_loss(b, self._forward))
        self.update_phase(loss)

    def state_bytes(self) -> int:
        """Bytes of the tensors the learner keeps beside the model's parameters and the learning rows.

        Fast mode: logits, noise, mask and two weight copies (13 B per fp16 weight, the masked copy being
        what the model reads). Lean mode: the 4 B of logits per weight plus a few floats per step and
        minibatch; per-layer transients exist only while a layer runs. Row losses add their Gram matrices.
        """
        mine = [v for k, v in vars(self).items() if k not in ("model", "modules", "batches", "teacher", "mode", "rows")]
        seen, total = set(), 0
        for value in mine + list(vars(self.mode).values()):
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        return total + (self.rows.state_bytes() if self.rows is not None else 0)

    # ---------------------------------------------------------------------------------------------- driver
    def final_masks(self) -> dict[str, torch.Tensor]:
        return self.mode.final_masks()

    def finish(self, masks: dict[str, torch.Tensor]) -> None:
        """Write the masked weights into the modules and release the learner's buffers and CUDA graph."""
        self.mode.finish(masks)
        self.teacher = self._forward = self.local = self.rows = None

    def prepare(self, resume: bool = True) -> None:
        """Resume from the work directory, or compute the initial-mask losses; build the forward pass."""
        resumed = resume and self.try_resume()
        if not distributed.agree(self.step):
            raise MaskproError(f"the processes start from different checkpoint steps ({self.step} here); put "
                               "--workdir on a filesystem that every process sees")
        if not resumed:
            self.compute_baselines()
            self.save_checkpoint()
        self._forward = self._forward or self._make_forward()

    def forward_loss(self, ids: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The (graph-replayed) loss of the current weights on one minibatch; call prepare() first."""
        return self._forward(ids, target)

    def run(self, resume: bool = True, stop_after: int | None = None) -> LearnResult:
        """Run to ``config.steps`` (or ``stop_after`` steps, for tests), checkpointing atomically."""
        cfg = self.cfg
        self.prepare(resume)
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"maskpro {self.nm}", unit="step",
                   disable=not (self.progress and self.group.is_main))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0, s0 = time.perf_counter(), self.step
        shown, first = t0, self.step + 1
        while self.step < end:
            self.train_step()
            if self.step == first and end > first:  # exclude the first step (graph capture, compilation)
                sync()
                t0, s0 = time.perf_counter(), self.step
            # every log_every steps on a GPU (reading the loss syncs), and at least every 2 s where steps are slow
            if self.step % cfg.log_every == 0 or self.step == end or time.perf_counter() - shown > 2.0:
                shown = time.perf_counter()
                bar.update(self.step - bar.n)
                bar.set_postfix(residual=f"{float(self.delta.mean()):+.4f}",
                                loss=f"{float(self.losses[self.step - 1]):.3f}")
            if self.step % cfg.checkpoint_every == 0 and self.step < end:
                self.save_checkpoint()
        sync()
        wall = time.perf_counter() - t0
        bar.close()
        self.save_checkpoint()
        n = self.step - s0
        masks = self.final_masks()
        final = (float(self.rows.losses([masks[k].to(self.device) for k in self.names]).mean())
                 if self.rows is not None else None)
        return LearnResult(masks=masks, steps=self.step, wall_s=wall, final_loss=final,
                           ms_per_step=1000 * wall / n if n else float("nan"),
                           residuals=self.residuals[: self.step].tolist(), losses=self.losses[: self.step].tolist(),
                           baseline_loss=float((self.base if self.rows is None else self.rows.base).mean()),
                           skipped_steps=int((~torch.isfinite(self.residuals[: self.step])).sum()))
