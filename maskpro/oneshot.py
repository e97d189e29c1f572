"""One-shot N:M pruning of a causal LM: magnitude, Wanda and SparseGPT, layer by layer on calibration data.

The model plumbing lives here; the scores and the OBS solver are pure math (``nm``, ``sparsegpt``).
Calibration follows the reference implementations: the inputs of the first decoder layer are captured for
every calibration sequence, then each layer is pruned from statistics of its inputs and re-run so the next
layer sees the pruned model's activations.

Large models: each block runs on its own device (a model spread by accelerate's ``device_map``), with the
calibration activations moved to it. Under ``torchrun`` the calibration windows are split over the ranks
in whole batches, the per-layer statistics (X^T X for SparseGPT, column norms for Wanda) are summed with
one all-reduce per layer, and every rank then solves the same problem, so all ranks end with the same
pruned model and nothing else is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from . import nm as nmlib
from .errors import MaskproError
from .models import decoder_layers, find_linears
from .nm import NM
from .sparsegpt import obs_prune

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneResult:
    """Masks (bool, True = kept) per layer name; for SparseGPT also the 'decided' dense weights."""

    masks: dict[str, torch.Tensor]
    decided: dict[str, torch.Tensor] = field(default_factory=dict)


class _Stop(Exception):
    pass


def capture_first_layer(model: nn.Module, calib: torch.Tensor, device: torch.device, batch: int):
    """Inputs (hidden states, per-batch kwargs) that the first decoder layer receives for each batch."""
    layers = decoder_layers(model)
    store: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        store.append((hidden.detach(), kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch):
                try:
                    model(input_ids=calib[i:i + batch].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return store


def layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def to_block_device(device: torch.device, hidden: torch.Tensor, kw: dict) -> tuple[torch.Tensor, dict]:
    """A block's inputs on the block's device (a no-op unless the model is spread over devices)."""
    from accelerate.utils import send_to_device

    if hidden.device == device:
        return hidden, kw
    return hidden.to(device), send_to_device(kw, device)


def calibrated_prune(model: nn.Module, calib: torch.Tensor, nm: NM, method: str,
                     targets: list[str] | None = None, batch: int = 8, keep_decided: bool = False,
                     fixed_masks: dict[str, torch.Tensor] | None = None,
                     progress: bool = True, exact: bool = False) -> PruneResult:
    """Wanda or SparseGPT, layer by layer; prunes ``model`` in place and returns the masks.

    With ``fixed_masks`` (SparseGPT only) the given masks are kept and only the weights are reconstructed; with
    ``exact`` (SparseGPT only) the kept weights are the least-squares fit for the mask, not SparseGPT's
    sequential updates (:func:`maskpro.sparsegpt.exact_refit`).
    """
    if method not in ("wanda", "sparsegpt"):
        raise MaskproError(f"calibrated_prune takes wanda or sparsegpt, not {method!r}")
    device = input_device(model)
    chosen = find_linears(model, targets)
    for name, mod in chosen.items():
        nmlib.check_shape(mod.weight.shape, nm, name)
    names_of = {id(m): n for n, m in chosen.items()}
    group = distributed.current()
    if group.distributed:  # this rank's whole batches; the statistics are summed below
        calib = distributed.calibration_share(calib, batch, group.rank, group.world_size)
    inputs = capture_first_layer(model, calib, device, batch)
    result = PruneResult({})
    layers = decoder_layers(model)
    for li, layer in enumerate(tqdm(layers, desc=f"{method} {nm}", disable=not progress, unit="layer")):
        subset = {names_of[id(m)]: m for m in layer.modules() if id(m) in names_of}
        stats: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def make_hook(name: str):
            def hook(mod, args, _out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                n_new = x.shape[0]
                if method == "wanda":
                    s = x.pow(2).sum(0)
                else:
                    s = x.T @ x
                stats[name] = stats[name] + s if name in stats else s
                counts[name] = counts.get(name, 0) + n_new
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in subset.items()]
        block = next(layer.parameters()).device
        inputs = [to_block_device(block, hidden, kw) for hidden, kw in inputs]
        with torch.no_grad():
            for hidden, kw in inputs:
                layer(hidden, **kw)
        for h in handles:
            h.remove()
        for name, mod in subset.items():
            w = mod.weight.data
            if name not in stats:
                raise MaskproError(f"layer {name} saw no calibration input; it is not used by the forward pass")
            if group.distributed:
                distributed.all_sum_(stats[name])
                counts[name] = int(distributed.all_sum_(torch.tensor(counts[name], device=stats[name].device)))
            if method == "wanda":
                norm = (stats[name] / counts[name]).sqrt()
                mask = nmlib.topn_mask(w.abs().float() * norm.reshape(1, -1), nm, name)
                mod.weight.data = w * mask
            else:
                h = stats[name] * (2.0 / counts[name])
                res = obs_prune(w, h, nm, mask=None if fixed_masks is None else fixed_masks[name].to(w.device),
                                exact=exact)
                mask = res.mask
                mod.weight.data = res.weight
                if keep_decided:
                    result.decided[name] = res.decided.cpu()
            result.masks[name] = mask.cpu()
        with torch.no_grad():  # the next layer sees this layer's pruned outputs
            inputs = [(layer_out(layer(hidden, **kw)), kw) for hidden, kw in inputs]
    return result


def magnitude_prune(model: nn.Module, nm: NM, targets: list[str] | None = None) -> PruneResult:
    masks = {}
    for name, mod in find_linears(model, targets).items():
        mask = nmlib.topn_mask(mod.weight.data.abs(), nm, name)
        mod.weight.data = mod.weight.data * mask
        masks[name] = mask.cpu()
    return PruneResult(masks)


def prune(model: nn.Module, method: str, nm: NM, calib: Callable[[], torch.Tensor] | torch.Tensor | None = None,
          targets: list[str] | None = None, **kw) -> PruneResult:
    """Prune ``model`` in place with a one-shot method; ``calib`` gives calibration token windows."""
    if method == "magnitude":
        return magnitude_prune(model, nm, targets)
    if method not in METHODS:
        raise MaskproError(f"unknown method {method!r}; choose from {', '.join(METHODS)} or maskpro")
    if calib is None:
        raise MaskproError(f"{method} needs calibration data; pass calibration token windows")
    data = calib() if callable(calib) else calib
    return calibrated_prune(model, data, nm, method, targets, **kw)
