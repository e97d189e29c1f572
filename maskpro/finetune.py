"""Sparse fine-tuning: train the kept weights of the whole pruned model against the dense model.

After a mask is fixed (one-shot, learned, re-fitted), the pruned model is trained end to end with AdamW on
its masked linears only, with the dense model as teacher (``maskpro.distill``: KL on the next-token
distribution, optionally every block's output too). Pruned entries stay exactly zero: their gradient is
masked before each step, and the weights are masked again after it, so the N:M pattern survives bit for bit.

Unlike the block re-fit (one block at a time, the dense block's output as target), every weight here sees
the final loss through all the blocks after it, which is what recovers the model's behaviour rather than
each block's output. It costs backward passes through the whole model: fp32 master weights and AdamW state
for the trained linears (16 B per weight) plus the activations of one micro-batch, and a teacher copy of the
model in its own dtype. The work directory keeps atomic checkpoints; a killed run resumes from the last one
to the same result (data order and schedule are functions of the step).
Under ``torchrun`` each rank runs its own rows of every step and the gradients are averaged, so the ranks
stay identical.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_cached, save_tensors, tensor_digest
from .distill import LOSSES, distill_loss
from .errors import MaskproError

log = logging.getLogger(__name__)

CHECKPOINT = "finetune-state.safetensors"


@dataclass
class FinetuneConfig:
    """AdamW on the kept weights with a warm-up then a linear decay to zero; ``steps=0`` turns it off."""

    steps: int = 0
    lr: float = 3e-4
    batch_size: int = 16        # rows per step (all processes together)
    micro_batch: int = 0        # rows per forward/backward pass (0: the whole batch of a process)
    loss: str = "kd"            # one of maskpro.distill.LOSSES
    temperature: float = 1.0
    hidden_weight: float = 1.0  # weight of the per-block hidden-state term of "kd+hidden"
    warmup: int = 20            # steps of linear warm-up
    grad_clip: float = 1.0      # max global grad norm (0: no clipping)
    seed: int = 0               # order of the rows
    checkpoint_every: int = 100
    log_every: int = 25

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise MaskproError(f"unknown --ft-loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        for flag, value in (("--ft-steps", self.steps), ("--ft-warmup", self.warmup),
                            ("--ft-micro-batch", self.micro_batch)):
            if value < 0:
                raise MaskproError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--ft-batch-size", self.batch_size), ("--checkpoint-every", self.checkpoint_every)):
            if value < 1:
                raise MaskproError(f"{flag} must be >= 1, got {value}")
        if not (self.lr > 0 and self.temperature > 0 and self.hidden_weight >= 0 and self.grad_clip >= 0):
            raise MaskproError(f"--ft-lr and --ft-temperature must be > 0 and --ft-hidden-weight >= 0, got "
                               f"{self.lr}, {self.temperature}, {self.hidden_weight}")
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise MaskproError(f"--ft-micro-batch {self.micro_batch} does not divide --ft-batch-size "
                               f"{self.batch_size}; pick a divisor")

    def fingerprint(self) -> dict:
        """Settings that change the result (logging, checkpoints and micro-batches may differ on resume)."""
        d = asdict(self)
        for k in ("checkpoint_every", "log_every", "micro_batch"):
            d.pop(k)
        return d

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - self.warmup))


def step_rows(n_rows: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Row indices of step ``step``: consecutive slices of one shuffle of the rows per epoch."""
    per_epoch = n_rows // batch
    if per_epoch < 1:
        raise MaskproError(f"{n_rows} training rows are fewer than --ft-batch-size {batch}; add data or lower it")
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[i * batch:(i + 1) * batch]


def peak_memory(device: torch.device) -> dict:
    """Peak device memory (GiB) since the last reset, and the process's peak host memory (GiB)."""
    out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if device.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


class SparseFinetuner:
    """Trains ``layers`` (masked linears of ``model``) against ``teacher`` on token ``rows``."""

    def __init__(self, model: nn.Module, teacher: nn.Module, layers: dict[str, nn.Linear],
                 masks: dict[str, torch.Tensor], rows: torch.Tensor, config: FinetuneConfig,
                 workdir: str | Path | None = None, progress: bool = True):
        self.model, self.teacher, self.cfg = model, teacher.eval(), config
        self.names = list(layers)
        self.layers = layers
        self.group = distributed.current()
        self.local = distributed.local_batch(config.batch_size, self.group.world_size)
        self.micro = config.micro_batch or self.local
        if self.local % self.micro:
            raise MaskproError(f"--ft-micro-batch {self.micro} does not divide the {self.local} rows each process "
                               "runs per step; pick a divisor")
        self.rows = rows
        self.device = next(model.parameters()).device
        self.masks = {n: masks[n].to(layers[n].weight.device, torch.bool) for n in self.names}
        self.path = Path(workdir) / CHECKPOINT if workdir else None
        self.progress = progress and distributed.is_main()
        self.key = {"config": config.fingerprint(), "layers": self.names,
                    "masks": tensor_digest(*(self.masks[n] for n in self.names)), "rows": tensor_digest(rows)}
        self.dtype = next(iter(layers.values())).weight.dtype
        self.autocast = self.device.type == "cuda"

    # -- training ----------------------------------------------------------------------------------------------
    def _prepare(self) -> list[nn.Parameter]:
        """fp32 student (bf16 autocast on GPUs), only the masked linears trainable, pruned entries zero."""
        self.model.float().train()
        self.model.config.use_cache = False
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        params = []
        for n in self.names:
            w = self.layers[n].weight
            w.data.mul_(self.masks[n])
            w.requires_grad_(True)
            params.append(w)
        return params

    def _micro_loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hidden = self.cfg.loss == "kd+hidden"
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            teacher = None
            if self.cfg.loss != "ce":
                with torch.no_grad():
                    teacher = self.teacher(ids, output_hidden_states=hidden, use_cache=False)
            student = self.model(ids, output_hidden_states=hidden, use_cache=False)
            return distill_loss(self.cfg.loss, student, teacher, ids, self.cfg.temperature, self.cfg.hidden_weight)

    def _step(self, step: int, params: list[nn.Parameter], opt: torch.optim.Optimizer) -> dict | None:
        idx = step_rows(self.rows.shape[0], self.cfg.batch_size, step, self.cfg.seed)
        idx = idx[self.group.rank * self.local:(self.group.rank + 1) * self.local]
        ids = self.rows[idx].to(self.device)
        total = torch.zeros((), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        for chunk in ids.split(self.micro):
            loss, p = self._micro_loss(chunk)
            share = chunk.shape[0] / self.local
            (loss * share).backward()
            total = total + loss.detach().float() * share
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v * share
        for w, n in zip(params, self.names):
            w.grad.mul_(self.masks[n])
            distributed.all_mean_(w.grad)
        # The step's figures averaged over the ranks: a non-finite loss anywhere makes the mean non-finite, so every
        # rank skips the same update (fp overflow), and this is the step's only host sync.
        figures = distributed.all_mean_(torch.stack([total, *parts.values()])).tolist()
        if not all(map(math.isfinite, figures)):
            opt.zero_grad(set_to_none=True)
            return None
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = self.cfg.lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for w, n in zip(params, self.names):
                w.mul_(self.masks[n])
        return {"loss": figures[0], **dict(zip(parts, figures[1:]))}

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _save(self, step: int, params, opt, history: list) -> None:
        if self.path is None or not distributed.is_main():
            return
        tensors = {f"w.{n}": w.data for n, w in zip(self.names, params)}
        for i, n in enumerate(self.names):
            st = opt.state.get(params[i])
            if st:
                tensors[f"m.{n}"], tensors[f"v.{n}"] = st["exp_avg"], st["exp_avg_sq"]
        save_tensors(tensors, self.path, {"key": self.key, "step": step, "history": history[-400:]})

    def _resume(self, params, opt) -> tuple[int, list]:
        """The step to start from and the loss history so far; loads a matching checkpoint's state."""
        hit = load_cached(self.path, self.key, "fine-tuning from the start")
        if hit is None:
            return 0, []
        tensors, meta = hit
        step = int(meta["step"])
        for i, n in enumerate(self.names):
            params[i].data.copy_(tensors[f"w.{n}"])
            if f"m.{n}" in tensors:
                opt.state[params[i]] = {"step": torch.tensor(float(step)),
                                        "exp_avg": tensors[f"m.{n}"].to(params[i].device),
                                        "exp_avg_sq": tensors[f"v.{n}"].to(params[i].device)}
        log.info("sparse fine-tune: resuming at step %d of %d from %s", step, self.cfg.steps, self.path)
        return step, list(meta.get("history", []))

    def run(self, resume: bool = True, stop_after: int | None = None) -> dict:
        """Train; returns a report (steps, wall time, losses, peak memory). Leaves the model in its dtype, eval."""
        cfg = self.cfg
        params = self._prepare()
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        start, history = self._resume(params, opt) if resume else (0, [])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=cfg.steps, initial=start, desc="sparse fine-tune", disable=not self.progress,
                   dynamic_ncols=True)
        t0, done, skipped = time.perf_counter(), start, 0
        try:
            for step in range(start, cfg.steps):
                if stop_after is not None and step - start >= stop_after:
                    break
                out = self._step(step, params, opt)
                done = step + 1
                if out is None:
                    skipped += 1
                else:
                    history.append([step, round(out["loss"], 5)])
                    bar.set_postfix({k: f"{v:.4f}" for k, v in out.items()}, refresh=False)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    mem = peak_memory(self.device)
                    log.info("sparse fine-tune step %d/%d: loss %s, peak memory %s", done, cfg.steps,
                             f"{history[-1][1]:.4f}" if history else "-",
                             ", ".join(f"{k} {v:.2f}" for k, v in mem.items()))
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    self._save(done, params, opt, history)
                bar.update(1)
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            self.model.to(self.dtype).eval()
        wall = time.perf_counter() - t0
        ran = done - start
        first = [h[1] for h in history[:20]]
        last = [h[1] for h in history[-20:]]
        return {**cfg.fingerprint(), "steps_done": done, "resumed_at": start, "wall_s": wall,
                "ms_per_step": 1000 * wall / ran if ran else float("nan"), "skipped_steps": skipped,
                "rows": int(self.rows.shape[0]), "seq_len": int(self.rows.shape[1]),
                "tokens_seen": done * cfg.batch_size * int(self.rows.shape[1]),
                "loss_first": sum(first) / len(first) if first else None,
                "loss_last": sum(last) / len(last) if last else None,
                "processes": self.group.world_size, **peak_memory(self.device)}
