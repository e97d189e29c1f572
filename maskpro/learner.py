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

Scaling out (see ``maskpro.distributed``): under ``torchrun`` every rank holds a replica, draws the same
masks from the same keys, runs its own rows of each global minibatch, and the ranks agree on the minibatch
loss with one all-reduce of a scalar per step, so the logits stay identical without being sent.
``memory="lean"`` keeps only the model's own weights plus 4 B of logits per weight: the mask is redrawn per
layer from (seed, step, layer) when the forward reads the weight and again in the update, so the logits can
live on each layer's own device when accelerate's ``device_map`` spreads a large model over several GPUs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from . import distributed, policy
from . import nm as nmlib
from .checkpoint import load_tensors, read_tensor_meta, save_tensors
from .integrity import check_safetensors
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
    loss: str = "ce"            # "ce": LM loss on the data (paper); "kd": soft cross-entropy against the
                                # next-token distribution of the model's weights at construction (the dense model)
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    cuda_graph: bool = True     # replay the forward pass from a CUDA graph on GPUs (fast memory mode only)
    compile: bool = True        # fuse sampling and the update with torch.compile on GPUs
    memory: str = "fast"        # "fast": flat buffers, 13 B per weight in fp16; "lean": the model's own weights
                                # plus 4 B of logits per weight, masks redrawn per layer (works with device_map)
    micro_batch: int = 0        # rows per forward pass (0: the whole batch of this process); the step loss is
                                # the mean over micro-batches, so only float rounding depends on it

    # Settings that change the result; the others (steps, logging, graphs, micro-batches) may differ on resume.
    def fingerprint(self) -> dict:
        d = asdict(self)
        for k in ("steps", "checkpoint_every", "log_every", "cuda_graph", "compile", "micro_batch"):
            d.pop(k)
        if d["memory"] == "fast":  # checkpoints written before the option existed stay valid
            d.pop("memory")
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


def _masked(theta: torch.Tensor, u: torch.Tensor, w0: torch.Tensor, n: int) -> torch.Tensor:
    """Lean mode's forward: only the masked weights (the mask is not kept; the update draws it again)."""
    return _sample_masked(theta, u, w0, n)[1]


def _redrawn_update(theta: torch.Tensor, u: torch.Tensor, adv: torch.Tensor, n: int) -> torch.Tensor:
    """Lean mode's update: redraw the step's mask from the same noise, then move the logits."""
    return _updated(theta, policy.sample_from_uniform(theta, u, n), adv, n)


def _layer_seed(seed: int, step: int, layer: int) -> int:
    """A 64-bit generator seed for one layer at one step (lean mode keys its noise by all three)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{layer}".encode(), digest_size=8).digest(), "little")


class _LeanMask(nn.Module):
    """Parametrization W -> W * mask: the mask is drawn from the layer's logits each time the weight is read."""

    def __init__(self, learner: "MaskProLearner", index: int):
        super().__init__()
        self.learner, self.index = learner, index

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.learner._lean_weight(self.index, w)


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
        if config.loss not in ("ce", "kd"):
            raise MaskproError(f"unknown learner loss {config.loss!r}; use ce or kd")
        if config.memory not in ("fast", "lean"):
            raise MaskproError(f"unknown learner memory mode {config.memory!r}; use fast or lean")
        self.names = list(layers)
        self.modules = [layers[n] for n in self.names]
        self.group = distributed.current()
        self.bs, self.micro, self.n_micro = self._batch_split(config)
        lean = config.memory == "lean"
        dev = self.device = self._home_device(lean)
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
        self.thetas: list[torch.Tensor] | None = None
        if lean:
            self._init_lean(prior, weights, batches)
        else:
            self._init_fast(prior, weights, batches, total, dtype)
        self.base = torch.zeros(self.n_batches, dtype=torch.float32, device=dev)
        self.delta = torch.zeros((), dtype=torch.float32, device=dev)
        self.residuals = torch.zeros(config.steps, dtype=torch.float32, device=dev)
        self.losses = torch.zeros(config.steps, dtype=torch.float32, device=dev)
        self.step = 0
        self._forward = None

    def _batch_split(self, cfg: LearnerConfig) -> tuple[int, int, int]:
        """(rows per step on this process, rows per forward pass, forward passes per step over all processes)."""
        local = distributed.local_batch(cfg.batch_size, self.group.world_size)
        micro = cfg.micro_batch or local
        if micro < 1 or local % micro:
            raise MaskproError(f"micro-batch {cfg.micro_batch} does not divide the {local} rows each process runs "
                               f"per step; pick a divisor of {local}")
        return local, micro, cfg.batch_size // micro

    def _home_device(self, lean: bool) -> torch.device:
        """Where the token rows and the residual tracker live: the target layers' device, or in lean mode the
        input embeddings' device (accelerate's device_map moves activations on from there)."""
        devices = {m.weight.device for m in self.modules}
        if lean:
            emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            return emb.weight.device if emb is not None else self.modules[0].weight.device
        if len(devices) > 1:
            raise MaskproError(f"the target layers are spread over {len(devices)} devices; the fast learner keeps "
                               "one flat buffer on one device, so use memory='lean' (--memory lean)")
        return self.modules[0].weight.device

    def _set_rows(self, batches: torch.Tensor) -> None:
        """The learning rows of this process (its share of every global minibatch) and their digest."""
        self.data_digest = _digest(batches)  # of all rows, so every rank and a single process agree
        if self.group.distributed:
            batches = distributed.shard_rows(batches, self.cfg.batch_size, self.group.rank, self.group.world_size)
        self.batches = batches.to(self.device)
        self.n_batches = batches.shape[0] // self.bs

    def _init_fast(self, prior: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None,
                   batches: torch.Tensor, total: int, dtype: torch.dtype) -> None:
        config, dev, shapes = self.cfg, self.device, self.shapes
        # Flat buffers: dense source weights, the live (masked) weights the model reads, logits, mask.
        self.w0 = torch.empty(total, dtype=dtype, device=dev)
        self.w = torch.empty(total, dtype=dtype, device=dev)
        self.theta = torch.empty(total, dtype=torch.float32, device=dev)
        self.mask = torch.empty(total, dtype=torch.bool, device=dev)
        dense_views = [m.weight.data for m in self.modules]
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
        self._set_rows(batches)
        # Teacher distributions come from the weights the modules held before the swap (set above).
        self.teacher = self._teacher_probs(dense_views) if config.loss == "kd" else None
        self.theta.copy_(self.mask.float() * config.scale)
        self.gen = torch.Generator(device=dev)
        self.noise = torch.empty(total, dtype=torch.float32, device=dev)
        fuse = dev.type == "cuda" and config.compile
        self._sample_fn = _maybe_compiled(_sample_masked, fuse)
        self._update_fn = _maybe_compiled(_updated, fuse)

    def _init_lean(self, prior: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None,
                   batches: torch.Tensor) -> None:
        """Logits per layer on the layer's device; the modules keep (and are overwritten with) the source weights."""
        cfg, m_ = self.cfg, self.nm.m
        if not cfg.scale > 0:
            raise MaskproError(f"lean memory mode needs --scale > 0 (the prior is read back from the logits), "
                               f"got {cfg.scale}")
        self.prior_digest = _digest(*(prior[n].reshape(-1).bool() for n in self.names))
        self.mask = self.noise = self.w = self.w0 = self.theta = None
        self._set_rows(batches)
        # The teacher sees the modules' weights as they are now, before the sources are copied in below.
        self.teacher = self._teacher_probs([m.weight.data for m in self.modules]) if cfg.loss == "kd" else None
        self.thetas = []
        with torch.no_grad():
            for n, m in zip(self.names, self.modules):
                pm = prior[n].to(m.weight.device).reshape(-1, m_).bool()
                if not bool((pm.sum(1) == self.nm.n).all()):
                    raise MaskproError(f"initial mask of {n} is not strict {self.nm}; build it with a one-shot "
                                       "method")
                if weights is not None and n in weights:
                    m.weight.data.copy_(weights[n].reshape(m.weight.shape))
                self.thetas.append(pm.float() * cfg.scale)
        self._gens: dict[torch.device, torch.Generator] = {}
        self._mode = "top"
        fuse = any(t.device.type == "cuda" for t in self.thetas) and cfg.compile
        self._masked_fn = _maybe_compiled(_masked, fuse)
        self._redrawn_fn = _maybe_compiled(_redrawn_update, fuse)
        for i, m in enumerate(self.modules):
            parametrize.register_parametrization(m, "weight", _LeanMask(self, i), unsafe=True)

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
        """Forward + loss; on CUDA captured once in a graph and replayed (weights and ids are static).

        Lean mode draws each layer's mask while the forward runs, from a generator seeded per step on the
        host, which a graph cannot replay, so it stays eager.
        """
        if self.thetas is not None:
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
        if self.micro == self.bs:
            return fn(ids, tgt)
        m = self.micro
        return sum(fn(ids[i:i + m], None if tgt is None else tgt[i:i + m]) for i in range(0, self.bs, m))

    def _global_mean_(self, local: torch.Tensor) -> torch.Tensor:
        """Mean over the micro-batches of all processes, in place: one SUM all-reduce (a scalar per step).

        The sum is exact for two terms, so 2 processes give the same bits as one process running the same
        micro-batches; a NaN or inf on any rank reaches every rank, which then all skip the update.
        """
        if self.group.distributed:
            distributed.all_sum_(local)
        return local if self.n_micro == 1 else local.div_(self.n_micro)

    # ------------------------------------------------------------------------------------------ the method
    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, self.nm.m)

    @torch.no_grad()
    def _set_weights(self, mask: torch.Tensor) -> None:
        torch.mul(self.w0, mask, out=self.w)

    @torch.no_grad()
    def compute_baselines(self) -> None:
        """Loss of every fixed minibatch under the initial mask (computed once, reused every epoch)."""
        if self.thetas is None:
            self._set_weights(self.mask)
        self._mode = "top"  # lean mode: the prior is the top-n of the initial logits
        for b in range(self.n_batches):
            self.base[b] = self._local_loss(b, self._home_loss)
        self._global_mean_(self.base)  # one all-reduce of the whole vector
        self._mode = "sample"

    @torch.no_grad()
    def sample_phase(self) -> None:
        """Draw this step's masks (noise keyed by seed and step) and write the masked weights."""
        if self.thetas is not None:
            self._mode = "sample"  # lean mode: each layer draws its mask when the forward reads its weight
            return
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
        if self.thetas is None:
            new = self._update_fn(self._groups(self.theta), self._groups(self.mask), adv, self.nm.n)
            self.theta.copy_(new.view(-1))
        else:
            self._lean_update(adv)
        self.residuals[t] = res
        self.losses[t] = loss
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

    # ------------------------------------------------------------------------------------------- lean mode
    def _layer_noise(self, i: int) -> torch.Tensor:
        """Layer ``i``'s uniform noise at the current step, keyed by (seed, step, layer): equal on every rank."""
        theta = self.thetas[i]
        gen = self._gens.get(theta.device)
        if gen is None:
            gen = self._gens[theta.device] = torch.Generator(device=theta.device)
        gen.manual_seed(_layer_seed(self.cfg.seed, self.step, i))
        return torch.rand(theta.shape, generator=gen, device=theta.device)

    def _lean_weight(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """The weight layer ``i`` computes with: W times the top-n of its logits, or times this step's draw."""
        theta = self.thetas[i]
        if self._mode == "top":
            return w * policy.top_n(theta, self.nm.n).view(w.shape)
        return self._masked_fn(theta, self._layer_noise(i), w.reshape(-1), self.nm.n).view(w.shape)

    def _lean_update(self, adv: torch.Tensor) -> None:
        """Each layer redraws this step's mask from the same keyed noise and moves its own logits."""
        per_device: dict[torch.device, torch.Tensor] = {}
        for i, theta in enumerate(self.thetas):
            a = per_device.get(theta.device)
            if a is None:
                a = per_device[theta.device] = adv.to(theta.device)
            theta.copy_(self._redrawn_fn(theta, self._layer_noise(i), a, self.nm.n))

    def state_bytes(self) -> int:
        """Bytes of the tensors the learner keeps beside the model's parameters and the learning rows.

        Fast mode: logits, noise, mask and two weight copies (13 B per fp16 weight, the masked copy being
        what the model reads). Lean mode: the 4 B of logits per weight plus a few floats per step and
        minibatch; per-layer transients exist only while a layer runs.
        """
        seen, total = set(), 0
        for key, value in vars(self).items():
            if key in ("model", "modules", "batches", "teacher"):
                continue
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        return total

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {"step": self.step, "config": self.cfg.fingerprint(), "layers": self.names,
                "prior": self.prior_digest, "data": self.data_digest}

    def _logits(self) -> dict[str, torch.Tensor]:
        if self.thetas is None:
            return {"theta": self.theta}
        return {f"theta.{n}": t for n, t in zip(self.names, self.thetas)}

    def save_checkpoint(self) -> None:
        """Rank 0 writes (atomically); the others wait, so every rank resumes from the same file."""
        if self.workdir is None:
            return
        if self.group.is_main:
            save_tensors({**self._logits(), "base": self.base, "delta": self.delta,
                          "residuals": self.residuals[: self.step], "losses": self.losses[: self.step]},
                         self.workdir / CHECKPOINT, self._meta())
        distributed.barrier()

    @staticmethod
    def check_resumable(workdir, cfg: LearnerConfig, names: list[str]) -> None:
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
        for key, theta in self._logits().items():
            theta.copy_(tensors[key].view(theta.shape))
        self.base.copy_(tensors["base"])
        self.delta.copy_(tensors["delta"])
        self.residuals[:step] = tensors["residuals"].to(self.device)
        self.losses[:step] = tensors["losses"].to(self.device)
        self.step = step
        log.info("resumed from %s at step %d", self.workdir / CHECKPOINT, step)
        return True

    # ---------------------------------------------------------------------------------------------- driver
    def final_masks(self) -> dict[str, torch.Tensor]:
        if self.thetas is not None:
            return {n: policy.top_n(t, self.nm.n).view(s).cpu()
                    for n, t, s in zip(self.names, self.thetas, self.shapes)}
        flat = policy.top_n(self._groups(self.theta), self.nm.n).view(-1)
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i]).cpu()
                for i, n in enumerate(self.names)}

    @torch.no_grad()
    def finish(self, masks: dict[str, torch.Tensor]) -> None:
        """Write the masked weights into standalone parameters (the flat buffers are released)."""
        if self.thetas is not None:  # lean: the modules' own weights are masked in place
            for n, m in zip(self.names, self.modules):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
                m.weight.data.mul_(masks[n].to(m.weight.device, m.weight.dtype))
            self.thetas = self.teacher = self._forward = None
            return
        for i, (n, m) in enumerate(zip(self.names, self.modules)):
            a, b = self.offsets[i], self.offsets[i + 1]
            m.weight.data = (self.w0[a:b].view(self.shapes[i]) * masks[n].to(self.device)).clone()
        self.w = self.w0 = self.theta = self.mask = self.noise = self.teacher = None
        self._forward = None  # drops the CUDA graph and its memory pool

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
