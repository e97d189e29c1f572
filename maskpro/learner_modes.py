"""Where the MaskPro learner keeps its logits and how it draws and updates masks: its two memory modes.

Both modes offer one interface to the learning loop in :mod:`maskpro.learner`:

* ``initial_weights()``: a context in which the model computes with the prior mask (the baseline losses);
* ``sample(step)``: draw the step's masks, from noise keyed by (seed, step);
* ``update(adv, step)``: move the logits along the score function of the step's masks, scaled by ``adv`` (a
  scalar, or one value per target layer);
* ``logits()`` (the checkpointed tensors, by checkpoint key), ``final_masks()``, ``finish(masks)``.

``FastMode`` keeps all logits in one flat fp32 buffer and all target weights as views into one flat buffer,
so sampling, masking and the update are a few whole-model tensor ops and the forward can be replayed from a
CUDA graph (13 B per fp16 weight). ``LeanMode`` keeps only the model's own weights plus 4 B of logits per
weight on each layer's own device: the mask is redrawn per layer from (seed, step, layer) when the forward
reads the weight and again in the update, so it works with accelerate's ``device_map``. On GPUs (N = 2, with
Triton) it draws and updates with :mod:`maskpro.lean_kernels`, whose noise lives only in registers: the same
keying, but a different random stream from the eager path's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import policy
from .errors import MaskproError
from .nm import NM

log = logging.getLogger(__name__)


def sample_masked(theta: torch.Tensor, u: torch.Tensor, w0: torch.Tensor, n: int):
    """One fused pass: draw the mask from noise ``u`` and produce the masked weights."""
    mask = policy.sample_from_uniform(theta, u, n)
    return mask, w0 * mask.view(-1)


def updated(theta: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, n: int) -> torch.Tensor:
    """theta + adv * d log P(mask) / d theta, with adv = -lr * (residual - baseline)."""
    return theta + adv * policy.log_prob_grad(theta, mask, n)


def masked(theta: torch.Tensor, u: torch.Tensor, w0: torch.Tensor, n: int) -> torch.Tensor:
    """Lean mode's forward: only the masked weights (the mask is not kept; the update draws it again)."""
    return sample_masked(theta, u, w0, n)[1]


def redrawn_update(theta: torch.Tensor, u: torch.Tensor, adv: torch.Tensor, n: int) -> torch.Tensor:
    """Lean mode's update: redraw the step's mask from the same noise, then move the logits."""
    return updated(theta, policy.sample_from_uniform(theta, u, n), adv, n)


def layer_seed(seed: int, step: int, layer: int) -> int:
    """A 64-bit generator seed for one layer at one step (lean mode keys its noise by all three)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{layer}".encode(), digest_size=8).digest(), "little")


def maybe_compiled(fn, enabled: bool):
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


def fused_kernels(thetas: list[torch.Tensor], n: int):
    """:mod:`maskpro.lean_kernels` if Triton is there and takes every layer's logits, else None (eager path)."""
    try:
        from . import lean_kernels
    except ImportError as exc:  # no Triton on this machine: the torch.compile'd path does the same work
        log.info("lean learner: no Triton (%s); drawing masks with torch", exc)
        return None
    if all(t.is_cuda and lean_kernels.supported(t, n) for t in thetas):
        return lean_kernels
    log.info("lean learner: the fused kernels take N=2 of M<=16 on CUDA only; drawing masks with torch")
    return None


class FastMode:
    """Flat buffers on one device: dense source weights, the masked weights the model reads, logits, mask."""

    graphable = True  # the weights live at fixed addresses, so the forward can be replayed from a CUDA graph

    @staticmethod
    def home_device(model: nn.Module, modules: list[nn.Linear]) -> torch.device:
        """The one device of the target layers (one flat buffer cannot span devices)."""
        devices = {m.weight.device for m in modules}
        if len(devices) > 1:
            raise MaskproError(f"the target layers are spread over {len(devices)} devices; the fast learner keeps "
                               "one flat buffer on one device, so use memory='lean' (--memory lean)")
        return modules[0].weight.device

    def __init__(self, nm: NM, names: list[str], modules: list[nn.Linear], prior: dict[str, torch.Tensor],
                 weights: dict[str, torch.Tensor] | None, *, device: torch.device, seed: int, scale: float,
                 compile: bool):
        self.nm, self.names, self.modules, self.seed = nm, names, modules, seed
        self.shapes = [m.weight.shape for m in modules]
        self.offsets = [0]
        for s in self.shapes:
            self.offsets.append(self.offsets[-1] + s.numel())
        total, dtype = self.offsets[-1], modules[0].weight.dtype
        self.w0 = torch.empty(total, dtype=dtype, device=device)
        self.w = torch.empty(total, dtype=dtype, device=device)
        self.theta = torch.empty(total, dtype=torch.float32, device=device)
        self.mask = torch.empty(total, dtype=torch.bool, device=device)
        for i, (n, m) in enumerate(zip(names, modules)):
            a, b = self.offsets[i], self.offsets[i + 1]
            src = weights[n] if weights is not None and n in weights else m.weight.data
            self.w0[a:b].copy_(src.reshape(-1))
            self.mask[a:b].copy_(prior[n].to(device).reshape(-1).bool())
            m.weight.data = self.w[a:b].view(self.shapes[i])
        self.theta.copy_(self.mask.float() * scale)
        self.gen = torch.Generator(device=device)
        self.noise = torch.empty(total, dtype=torch.float32, device=device)
        self.repeats: dict[int, torch.Tensor] = {}  # groups per layer or per row, by advantage length
        fuse = device.type == "cuda" and compile
        self.sample_fn = maybe_compiled(sample_masked, fuse)
        self.update_fn = maybe_compiled(updated, fuse)

    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, self.nm.m)

    @contextlib.contextmanager
    def initial_weights(self) -> Iterator[None]:
        """The model computes with the prior: the mask buffer still holds it before the first draw."""
        with torch.no_grad():
            torch.mul(self.w0, self.mask, out=self.w)
        yield

    @torch.no_grad()
    def sample(self, step: int) -> None:
        self.gen.manual_seed(self.seed * 1_000_003 + step)
        torch.rand(self.noise.shape, generator=self.gen, out=self.noise)
        mask, w = self.sample_fn(self._groups(self.theta), self._groups(self.noise), self.w0, self.nm.n)
        self.mask.copy_(mask.view(-1))
        self.w.copy_(w)

    @torch.no_grad()
    def update(self, adv: torch.Tensor, step: int) -> None:
        if adv.dim():  # one advantage per layer or per output row: spread over its groups
            adv = self._spread(adv).unsqueeze(1)
        new = self.update_fn(self._groups(self.theta), self._groups(self.mask), adv, self.nm.n)
        self.theta.copy_(new.view(-1))

    def _spread(self, adv: torch.Tensor) -> torch.Tensor:
        """Repeat one value per layer (``len(adv)`` = layers) or per output row over its groups (or take one per
        group as it is), on the device."""
        if adv.numel() == self.theta.numel() // self.nm.m:  # one per group already
            return adv
        counts = self.repeats.get(adv.numel())
        if counts is None:
            m = self.nm.m
            per = ([s.numel() // m for s in self.shapes] if adv.numel() == len(self.shapes)
                   else [s[1] // m for s in self.shapes for _ in range(s[0])])
            if len(per) != adv.numel():
                raise ValueError(f"{adv.numel()} advantages fit neither {len(self.shapes)} layers nor {len(per)} rows")
            counts = self.repeats[adv.numel()] = torch.tensor(per, device=adv.device)
        return torch.repeat_interleave(adv, counts, output_size=self.theta.numel() // self.nm.m)

    def layer_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer views of a flat buffer (``w0``, ``mask``) in the layers' weight shapes."""
        return [flat[a:b].view(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def logits(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta}

    def final_masks(self) -> dict[str, torch.Tensor]:
        flat = policy.top_n(self._groups(self.theta), self.nm.n).view(-1)
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i]).cpu()
                for i, n in enumerate(self.names)}

    @torch.no_grad()
    def finish(self, masks: dict[str, torch.Tensor]) -> None:
        """Write the masked weights into standalone parameters and release the flat buffers."""
        for i, (n, m) in enumerate(zip(self.names, self.modules)):
            a, b = self.offsets[i], self.offsets[i + 1]
            m.weight.data = (self.w0[a:b].view(self.shapes[i]) * masks[n].to(self.w0.device)).clone()
        self.w = self.w0 = self.theta = self.mask = self.noise = None


class LeanMask(nn.Module):
    """Parametrization W -> W * mask: the mask is drawn from the layer's logits each time the weight is read."""

    def __init__(self, mode: "LeanMode", index: int):
        super().__init__()
        self.mode, self.index = mode, index

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mode.weight(self.index, w)


class LeanMode:
    """Logits per layer on the layer's device; the modules keep (and are overwritten with) the source weights."""

    graphable = False  # masks are drawn from host-seeded generators during the forward, which a graph cannot replay

    @staticmethod
    def home_device(model: nn.Module, modules: list[nn.Linear]) -> torch.device:
        """The input embeddings' device: accelerate's device_map moves activations on from there."""
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        return emb.weight.device if emb is not None else modules[0].weight.device

    def __init__(self, nm: NM, names: list[str], modules: list[nn.Linear], prior: dict[str, torch.Tensor],
                 weights: dict[str, torch.Tensor] | None, *, device: torch.device, seed: int, scale: float,
                 compile: bool):
        self.nm, self.names, self.modules, self.seed = nm, names, modules, seed
        self.shapes = [m.weight.shape for m in modules]
        self.thetas: list[torch.Tensor] = []
        with torch.no_grad():
            for n, m in zip(names, modules):
                pm = prior[n].to(m.weight.device).reshape(-1, nm.m).bool()
                if weights is not None and n in weights:
                    m.weight.data.copy_(weights[n].reshape(m.weight.shape))
                self.thetas.append(pm.float() * scale)
        self._gens: dict[torch.device, torch.Generator] = {}
        self.drawing = False  # False: the forward reads the top-n of the logits (the prior), True: draws
        self.step = 0
        fuse = any(t.device.type == "cuda" for t in self.thetas) and compile
        self.kernels = fused_kernels(self.thetas, nm.n) if fuse else None
        self.masked_fn = maybe_compiled(masked, fuse and self.kernels is None)
        self.redrawn_fn = maybe_compiled(redrawn_update, fuse and self.kernels is None)
        for i, m in enumerate(modules):
            parametrize.register_parametrization(m, "weight", LeanMask(self, i), unsafe=True)

    def _layer_noise(self, i: int) -> torch.Tensor:
        """Layer ``i``'s uniform noise at the current step, keyed by (seed, step, layer): equal on every rank."""
        theta = self.thetas[i]
        gen = self._gens.get(theta.device)
        if gen is None:
            gen = self._gens[theta.device] = torch.Generator(device=theta.device)
        gen.manual_seed(layer_seed(self.seed, self.step, i))
        return torch.rand(theta.shape, generator=gen, device=theta.device)

    def weight(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """The weight layer ``i`` computes with: W times the top-n of its logits, or times this step's draw."""
        theta = self.thetas[i]
        if not self.drawing:
            return w * policy.top_n(theta, self.nm.n).view(w.shape)
        if self.kernels is not None:
            seed = layer_seed(self.seed, self.step, i)
            return self.kernels.draw(theta, w.reshape(-1), seed, self.nm.n).view(w.shape)
        return self.masked_fn(theta, self._layer_noise(i), w.reshape(-1), self.nm.n).view(w.shape)

    @contextlib.contextmanager
    def initial_weights(self) -> Iterator[None]:
        """The prior is the top-n of the initial logits; afterwards each forward draws."""
        self.drawing = False
        yield
        self.drawing = True

    def sample(self, step: int) -> None:
        """Nothing to draw now: each layer draws its mask when the forward reads its weight."""
        self.drawing, self.step = True, step

    @torch.no_grad()
    def update(self, adv: torch.Tensor, step: int) -> None:
        """Each layer redraws this step's mask from the same keyed noise and moves its own logits."""
        self.step = step
        per_device: dict[torch.device, torch.Tensor] = {}
        for i, theta in enumerate(self.thetas):
            a = per_device.get(theta.device)
            if a is None:
                a = per_device[theta.device] = adv.to(theta.device, torch.float32)
            if a.dim():  # one advantage per layer
                a = a[i:i + 1] if self.kernels is not None else a[i]
            if self.kernels is not None:
                self.kernels.update_(theta, a, layer_seed(self.seed, step, i))
                continue
            theta.copy_(self.redrawn_fn(theta, self._layer_noise(i), a, self.nm.n))

    def logits(self) -> dict[str, torch.Tensor]:
        return {f"theta.{n}": t for n, t in zip(self.names, self.thetas)}

    def final_masks(self) -> dict[str, torch.Tensor]:
        return {n: policy.top_n(t, self.nm.n).view(s).cpu() for n, t, s in zip(self.names, self.thetas, self.shapes)}

    @torch.no_grad()
    def finish(self, masks: dict[str, torch.Tensor]) -> None:
        """Mask the modules' own weights in place and drop the parametrizations and the logits."""
        for n, m in zip(self.names, self.modules):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight.data.mul_(masks[n].to(m.weight.device, m.weight.dtype))
        self.thetas = None


MODES = {"fast": FastMode, "lean": LeanMode}
