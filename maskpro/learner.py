"""The MaskPro learner: policy-gradient mask learning with forward passes only.

Each step draws one N:M mask per group from the current logits, runs one forward pass on a minibatch, and
moves the logits along the exact score function of the drawn subsets, weighted by the *residual*
``loss(sampled mask) - loss(initial mask)`` on the same minibatch minus a moving average of that residual
(the variance reduction of the MaskPro paper, arXiv 2506.12876).

What makes it fast: all logits live in one flat fp32 buffer and all target weights are views into one flat
buffer, so sampling, masking and the update are a few whole-model tensor ops instead of hundreds of per-layer
launches; the initial mask's loss of each fixed minibatch is computed once; the residual tracker stays on
the device (no host sync per step); on CUDA the forward pass is replayed from a CUDA graph.
Randomness is keyed by (seed, step), so a resumed run draws exactly the masks an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import nm as nmlib
from . import policy
from .checkpoint import load_tensors, save_tensors
from .errors import MaskproError
from .nm import NM

log = logging.getLogger(__name__)

CHECKPOINT = "learner-state.safetensors"


@dataclass
class LearnerConfig:
    """Hyper-parameters of a MaskPro run (defaults: the paper's settings for LLMs)."""

    nm: str = "2:4"
    steps: int = 1000
    lr: float = 50.0            # step size on the logits
    lr_schedule: str = "linear"  # "linear" decays lr to 0 at the last step (settles the policy); or "constant"
    scale: float = 10.0         # initial logits = prior mask * scale
    batch_size: int = 32
    ema: float = 0.99           # moving average of the residual (baseline)
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    cuda_graph: bool = True     # replay the forward pass from a CUDA graph on GPUs
    compile: bool = True        # fuse sampling and the update with torch.compile on GPUs

    # Settings that change the result; the others (steps, logging, graphs) may differ on resume.
    def fingerprint(self) -> dict:
        d = asdict(self)
        for k in ("steps", "checkpoint_every", "log_every", "cuda_graph", "compile"):
            d.pop(k)
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


def _sample_masked(theta: torch.Tensor, u: torch.Tensor, w0: torch.Tensor, n: int):
    """One fused pass: draw the mask from noise ``u`` and produce the masked weights."""
    mask = policy.sample_from_uniform(theta, u, n)
    return mask, w0 * mask.view(-1)


def _updated(theta: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, n: int) -> torch.Tensor:
    """theta + adv * d log P(mask) / d theta, with adv = -lr * (residual - baseline)."""
    return theta + adv * policy.log_prob_grad(theta, mask, n)


def _maybe_compiled(fn, enabled: bool):
    """torch.compile ``fn`` for GPUs, falling back to eager if compilation fails on first use."""
    if not enabled:
        return fn
    state = {"fn": torch.compile(fn, dynamic=False), "first": True}

    def call(*args):
        if not state["first"]:
            return state["fn"](*args)
        state["first"] = False
        try:  # compilation happens on the first call; later errors are real and must surface
            out = state["fn"](*args)
            torch.cuda.synchronize()
            return out
        except Exception as exc:  # an old or broken triton/inductor: keep working, only slower
            if "device-side assert" in str(exc):  # a real fault, not a compiler problem
                raise
            log.warning("torch.compile failed (%s); using eager kernels", str(exc).splitlines()[0][:200])
            state["fn"] = fn
            return fn(*args)
    return call


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class MaskProLearner:
    """Learns N:M masks for ``layers`` of ``model`` from ``prior`` masks on fixed token ``batches``.

    ``weights`` optionally replaces the dense weights the masks are applied to (e.g. SparseGPT's
    reconstructed values); by default the model's current weights are used.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Linear], prior: dict[str, torch.Tensor],
                 batches: torch.Tensor, config: LearnerConfig, workdir: str | Path | None = None,
                 weights: dict[str, torch.Tensor] | None = None, progress: bool = True):
        self.model, self.cfg, self.progress = model, config, progress
        self.nm = NM.parse(config.nm)
        if config.lr_schedule not in ("linear", "constant"):
            raise MaskproError(f"unknown lr schedule {config.lr_schedule!r}; use linear or constant")
        self.workdir = Path(workdir) if workdir else None
        if batches.dim() != 2 or batches.shape[0] < config.batch_size:
            raise MaskproError(f"need at least batch_size={config.batch_size} token rows to learn from, "
                               f"got {tuple(batches.shape)}; lower --batch-size or add data")
        missing = [n for n in layers if n not in prior]
        if missing:
            raise MaskproError(f"no initial mask for layer {missing[0]}; the prior must cover every target layer")
        self.names = list(layers)
        self.modules = [layers[n] for n in self.names]
        dev = self.device = self.modules[0].weight.device
        dtype = self.modules[0].weight.dtype
        shapes = [m.weight.shape for m in self.modules]
        for n, s in zip(self.names, shapes):
            nmlib.check_shape(s, self.nm, n)
        self.shapes = shapes
        sizes = [s.numel() for s in shapes]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        total = self.offsets[-1]
        # Flat buffers: dense source weights, the live (masked) weights the model reads, logits, mask.
        self.w0 = torch.empty(total, dtype=dtype, device=dev)
        self.w = torch.empty(total, dtype=dtype, device=dev)
        self.theta = torch.empty(total, dtype=torch.float32, device=dev)
        self.mask = torch.empty(total, dtype=torch.bool, device=dev)
        for i, (n, m) in enumerate(zip(self.names, self.modules)):
            a, b = self.offsets[i], self.offsets[i + 1]
            src = weights[n] if weights is not None and n in weights else m.weight.data
            self.w0[a:b].copy_(src.reshape(-1))
            pm = prior[n].to(dev).reshape(-1).bool()
            if not bool((pm.view(-1, self.nm.m).sum(1) == self.nm.n).all()):
                raise MaskproError(f"initial mask of {n} is not strict {self.nm}; build it with a one-shot method")
            self.mask[a:b].copy_(pm)
            m.weight.data = self.w[a:b].view(shapes[i])
        self.prior_digest = _digest(self.mask)
        self.theta.copy_(self.mask.float() * config.scale)
        self.batches = batches.to(dev)
        self.n_batches = batches.shape[0] // config.batch_size
        self.data_digest = _digest(self.batches)
        self.base = torch.zeros(self.n_batches, dtype=torch.float32, device=dev)
        self.delta = torch.zeros((), dtype=torch.float32, device=dev)
        self.residuals = torch.zeros(config.steps, dtype=torch.float32, device=dev)
        self.losses = torch.zeros(config.steps, dtype=torch.float32, device=dev)
        self.step = 0
        self.gen = torch.Generator(device=dev)
        self.noise = torch.empty(total, dtype=torch.float32, device=dev)
        fuse = dev.type == "cuda" and config.compile
        self._sample_fn = _maybe_compiled(_sample_masked, fuse)
        self._update_fn = _maybe_compiled(_updated, fuse)
        self._forward = None

    # ----------------------------------------------------------------------------------------------- model
    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss.float()

    def _make_forward(self):
        """Forward + loss; on CUDA captured once in a graph and replayed (weights and ids are static)."""
        eager = self._loss
        if self.device.type != "cuda" or not self.cfg.cuda_graph:
            return eager
        static = self.batches[: self.cfg.batch_size].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                eager(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = eager(static)
        except Exception as exc:  # some models do host syncs in forward; fall back to eager
            log.warning("CUDA graph capture failed (%s); running the forward pass eagerly", exc)
            return eager

        def replay(ids: torch.Tensor) -> torch.Tensor:
            static.copy_(ids)
            graph.replay()
            return out
        return replay

    def batch(self, b: int) -> torch.Tensor:
        bs = self.cfg.batch_size
        return self.batches[b * bs:(b + 1) * bs]

    # ------------------------------------------------------------------------------------------ the method
    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, self.nm.m)

    @torch.no_grad()
    def _set_weights(self, mask: torch.Tensor) -> None:
        torch.mul(self.w0, mask, out=self.w)

    @torch.no_grad()
    def compute_baselines(self) -> None:
        """Loss of every fixed minibatch under the initial mask (computed once, reused every epoch)."""
        self._set_weights(self.mask)
        for b in range(self.n_batches):
            self.base[b] = self._loss(self.batch(b))

    @torch.no_grad()
    def sample_phase(self) -> None:
        """Draw this step's masks (noise keyed by seed and step) and write the masked weights."""
        self.gen.manual_seed(self.cfg.seed * 1_000_003 + self.step)
        torch.rand(self.noise.shape, generator=self.gen, out=self.noise)
        mask, w = self._sample_fn(self._groups(self.theta), self._groups(self.noise), self.w0, self.nm.n)
        self.mask.copy_(mask.view(-1))
        self.w.copy_(w)

    @torch.no_grad()
    def update_phase(self, loss: torch.Tensor) -> None:
        """Residual against the initial mask on the same minibatch, minus its moving average, times score."""
        t, cfg = self.step, self.cfg
        b = t % self.n_batches
        res = loss - self.base[b]
        # A non-finite loss (fp16 overflow under an extreme sample) must not poison the logits: skip it.
        ok = torch.isfinite(res)
        res0 = torch.where(ok, res, 0.0)
        self.delta.copy_(torch.where(ok, self.delta * cfg.ema + res0 * (1 - cfg.ema), self.delta))
        adv = torch.where(ok, (res0 - self.delta) * -self.lr_at(t), 0.0)
        new = self._update_fn(self._groups(self.theta), self._groups(self.mask), adv, self.nm.n)
        self.theta.copy_(new.view(-1))
        self.residuals[t] = res
        self.losses[t] = loss
        self.step = t + 1

    def lr_at(self, t: int) -> float:
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return self.cfg.lr * (1 - t / self.cfg.steps)

    def train_step(self) -> None:
        self.sample_phase()
        loss = self._forward(self.batch(self.step % self.n_batches))
        self.update_phase(loss)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {"step": self.step, "config": self.cfg.fingerprint(), "layers": self.names,
                "prior": self.prior_digest, "data": self.data_digest}

    def save_checkpoint(self) -> None:
        if self.workdir is None:
            return
        save_tensors({"theta": self.theta, "base": self.base, "delta": self.delta,
                      "residuals": self.residuals[: self.step], "losses": self.losses[: self.step]},
                     self.workdir / CHECKPOINT, self._meta())

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
        self.theta.copy_(tensors["theta"])
        self.base.copy_(tensors["base"])
        self.delta.copy_(tensors["delta"])
        self.residuals[:step] = tensors["residuals"].to(self.device)
        self.losses[:step] = tensors["losses"].to(self.device)
        self.step = step
        log.info("resumed from %s at step %d", self.workdir / CHECKPOINT, step)
        return True

    # ---------------------------------------------------------------------------------------------- driver
    def final_masks(self) -> dict[str, torch.Tensor]:
        flat = policy.top_n(self._groups(self.theta), self.nm.n).view(-1)
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i]).cpu()
                for i, n in enumerate(self.names)}

    @torch.no_grad()
    def finish(self, masks: dict[str, torch.Tensor]) -> None:
        """Write the masked weights into standalone parameters (the flat buffers are released)."""
        for i, (n, m) in enumerate(zip(self.names, self.modules)):
            a, b = self.offsets[i], self.offsets[i + 1]
            m.weight.data = (self.w0[a:b].view(self.shapes[i]) * masks[n].to(self.device)).clone()
        self.w = self.w0 = self.theta = self.mask = self.noise = None
        self._forward = None  # drops the CUDA graph and its memory pool

    def prepare(self, resume: bool = True) -> None:
        """Resume from the work directory, or compute the initial-mask losses; build the forward pass."""
        if not (resume and self.try_resume()):
            self.compute_baselines()
            self.save_checkpoint()
        self._forward = self._forward or self._make_forward()

    def forward_loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The (graph-replayed) loss of the current weights on one minibatch; call prepare() first."""
        return self._forward(ids)

    def run(self, resume: bool = True, stop_after: int | None = None) -> LearnResult:
        """Run to ``config.steps`` (or ``stop_after`` steps, for tests), checkpointing atomically."""
        cfg = self.cfg
        self.prepare(resume)
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"maskpro {self.nm}", unit="step",
                   disable=not self.progress)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0, s0 = time.perf_counter(), self.step
        first = self.step + 1
        while self.step < end:
            self.train_step()
            if self.step == first and end > first:  # exclude the first step (graph capture, compilation)
                sync()
                t0, s0 = time.perf_counter(), self.step
            if self.step % cfg.log_every == 0 or self.step == end:
                bar.update(self.step - bar.n)
                bar.set_postfix(residual=f"{float(self.delta):+.4f}", loss=f"{float(self.losses[self.step - 1]):.3f}")
            if self.step % cfg.checkpoint_every == 0 and self.step < end:
                self.save_checkpoint()
        sync()
        wall = time.perf_counter() - t0
        bar.close()
        self.save_checkpoint()
        n = self.step - s0
        return LearnResult(masks=self.final_masks(), steps=self.step, wall_s=wall,
                           ms_per_step=1000 * wall / n if n else float("nan"),
                           residuals=self.residuals[: self.step].tolist(), losses=self.losses[: self.step].tolist(),
                           baseline_loss=float(self.base.mean()),
                           skipped_steps=int((~torch.isfinite(self.residuals[: self.step])).sum()))
