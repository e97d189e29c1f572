"""Block-wise reconstruction: re-fit the kept weights of each decoder block to the dense block's outputs.

A mask (one-shot or learned) fixes which weights stay; this step only moves the kept values. Decoder blocks
are processed in order. Block ``i`` of the sparse model gets the sparse model's own activations (after the
blocks already re-fitted) and is trained with Adam to reproduce the dense model's block output on the dense
model's activations, so each block also corrects the error accumulated before it. The masks never change:
gradients of pruned entries are zeroed and the weights are re-masked after every step. Training runs on an
fp32 copy of the block (bf16 autocast on GPUs) and writes back in the model's dtype.

Unlike SparseGPT's OBS re-fit (one linear layer at a time, a quadratic model of that layer's output), this
fits the block end to end through the attention and the MLP nonlinearity. It needs backward passes through
one block at a time, so its memory is one block's fp32 weights, its Adam state and one micro-batch of
activations, plus the two activation streams of the calibration set. It is the approach of block-wise
sparse fine-tuning (e.g. EBFT, arXiv 2402.12419), written for maskpro's masks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from accelerate.utils import recursively_apply
from torch import nn
from tqdm.auto import tqdm

from .errors import MaskproError
from .models import decoder_layers, find_linears
from .oneshot import capture_first_layer, input_device, layer_out, to_block_device

log = logging.getLogger(__name__)


@dataclass
class BlockReconConfig:
    """Adam on each block's kept weights; the loss is the MSE to the dense block output."""

    epochs: int = 5            # passes over the calibration windows per block
    lr: float = 1e-3           # 1e-4: 58.4, 3e-4: 49.4, 1e-3: 43.9, 3e-3: 44.1 WikiText-2 after SparseGPT (H100)
    micro_batch: int = 2       # calibration windows per optimizer step
    seed: int = 0              # order of the windows

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.epochs < 1 or self.micro_batch < 1 or not self.lr > 0:
            raise MaskproError(f"block reconstruction needs epochs >= 1, micro_batch >= 1 and lr > 0, got "
                               f"{self.epochs}, {self.micro_batch}, {self.lr}; fix --recon-epochs/--recon-lr")


def _as_float32(kw: dict) -> dict:
    """A block's keyword arguments with their floating tensors (position embeddings, masks) in fp32."""
    return recursively_apply(lambda t: t.float() if t.is_floating_point() else t, kw)


def _rows(kw: dict, sel: torch.Tensor, n: int) -> dict:
    """The selected batch rows of a block's keyword arguments (tensors whose first dimension is the batch)."""
    if n == 1:
        return kw
    return recursively_apply(lambda t: t.index_select(0, sel.to(t.device)) if t.dim() and t.shape[0] == n else t, kw)


def _swap(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put ``weights`` into the linears; returns the tensors they held."""
    old = {}
    for n, m in linears.items():
        old[n] = m.weight.data
        m.weight.data = weights[n].to(m.weight.device, m.weight.dtype)
    return old


def reconstruct_blocks(model: nn.Module, dense: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                       calib: torch.Tensor, config: BlockReconConfig | None = None, batch: int = 8,
                       progress: bool = True) -> dict:
    """Re-fit the kept weights of ``model``'s masked linears block by block; returns per-block errors.

    ``dense`` holds the dense weights of every masked layer (the teacher), ``masks`` the masks (True = kept),
    ``calib`` the (windows, seq_len) calibration tokens. The model is changed in place.
    """
    cfg = config or BlockReconConfig()
    cfg.validate()
    targets = find_linears(model, list(masks))
    missing = [n for n in masks if n not in targets or n not in dense]
    if missing:
        raise MaskproError(f"block reconstruction has no layer or dense weight for {missing[0]}; "
                           "pass the dense weights of every masked layer")
    names_of = {id(m): n for n, m in targets.items()}
    device = input_device(model)
    sparse_in = capture_first_layer(model, calib, device, batch)
    dense_in = [(h.clone(), kw) for h, kw in sparse_in]  # both streams start from the same embeddings
    gen = torch.Generator().manual_seed(cfg.seed)
    report = []
    for li, layer in enumerate(tqdm(decoder_layers(model), desc="block reconstruction", disable=not progress,
                                    unit="block")):
        linears = {names_of[id(m)]: m for m in layer.modules() if id(m) in names_of}
        block = next(layer.parameters()).device
        sparse_in = [to_block_device(block, h, kw) for h, kw in sparse_in]
        dense_in = [to_block_device(block, h, kw) for h, kw in dense_in]
        with torch.no_grad():  # the dense block's outputs on the dense stream: the targets
            kept = _swap(linears, dense)
            dense_out = [layer_out(layer(h, **kw)) for h, kw in dense_in]
            _swap(linears, kept)
        if linears:
            report.append({"block": li, **_fit_block(layer, linears, masks, sparse_in, dense_out, cfg, gen)})
        with torch.no_grad():
            sparse_in = [(layer_out(layer(h, **kw)), kw) for h, kw in sparse_in]
        dense_in = [(y, kw) for y, (_, kw) in zip(dense_out, dense_in)]
    return {"method": "block", "epochs": cfg.epochs, "lr": cfg.lr, "micro_batch": cfg.micro_batch,
            "blocks": report}


def _fit_block(layer: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
               inputs: list[tuple[torch.Tensor, dict]], targets: list[torch.Tensor], cfg: BlockReconConfig,
               gen: torch.Generator) -> dict:
    """Adam on an fp32 copy of one block; writes the fitted kept weights back. Returns MSE before/after."""
    work = copy.deepcopy(layer).float().train()
    params, keep = [], []
    own = {n: m for n, m in work.named_modules()}
    prefix = {id(m): n for n, m in layer.named_modules()}
    for name, mod in linears.items():
        twin = own[prefix[id(mod)]]
        mask = masks[name].to(twin.weight.device, torch.float32)
        twin.weight.data.mul_(mask)
        params.append(twin.weight)
        keep.append(mask)
    for p in work.parameters():
        p.requires_grad_(any(p is q for q in params))
    # Rows of every calibration batch, as (batch index, row) pairs, so micro-batches can mix batches.
    rows = [(b, r) for b, (h, _) in enumerate(inputs) for r in range(h.shape[0])]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    dev = params[0].device
    kw32 = [_as_float32(kw) for _, kw in inputs]  # cast once per block, not at every step
    # bf16 autocast on GPUs (fp32 master weights and loss): the block's matmuls on tensor cores.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def loss_on(idx: list[tuple[int, int]]) -> torch.Tensor:
        total = torch.zeros((), device=dev)
        by_batch: dict[int, list[int]] = {}
        for b, r in idx:
            by_batch.setdefault(b, []).append(r)
        for b, rs in by_batch.items():
            h = inputs[b][0]
            sel = torch.tensor(rs, device=h.device)
            with amp:
                out = layer_out(work(h.index_select(0, sel).float(), **_rows(kw32[b], sel, h.shape[0]))).float()
            y = targets[b].index_select(0, sel).float()
            total = total + (out - y).pow(2).mean() * len(rs)
        return total / len(idx)

    def mse() -> float:
        with torch.no_grad():
            return sum(float(loss_on([(b, r) for r in range(h.shape[0])])) * h.shape[0]
                       for b, (h, _) in enumerate(inputs)) / len(rows)

    before = mse()
    steps = 0
    finite = torch.ones((), dtype=torch.bool, device=dev)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(order), cfg.micro_batch):
            loss = loss_on([rows[j] for j in order[i:i + cfg.micro_batch]])
            finite &= torch.isfinite(loss.detach())  # checked once per epoch: no host sync per step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in zip(params, keep):
                p.grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, keep):
                    p.mul_(m)
            steps += 1
        if not bool(finite):
            raise MaskproError("block reconstruction diverged (non-finite loss); lower --recon-lr")
    after = mse()
    if after > before:  # never make a block worse than it came in
        log.warning("block reconstruction raised a block's error (%.3g -> %.3g); keeping its weights", before, after)
        return {"mse_before": before, "mse_after": before, "steps": steps, "kept_input": True}
    for mod, p in zip(linears.values(), params):
        mod.weight.data = p.detach().to(mod.weight.dtype)
    return {"mse_before": before, "mse_after": after, "steps": steps}
