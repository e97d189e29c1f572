"""The running decode batch and the surgery on its KV cache when rows join or leave.

Rows are left padded: a dynamic cache's columns line up at the right end, and a mask marks the padding.
Joining pads the shorter cache on the left with masked zeros and concatenates along the batch axis; leaving
selects the kept rows and cuts the columns that are padding for all of them. Rows in a static slot cache
(:mod:`maskpro.serve.slot_cache`) are already in place and are compacted by the cache itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .request import GenerationRequest

__all__ = ["Batch", "cache_layers", "cache_joinable", "merge_batches", "select_rows"]


@dataclass
class Batch:
    """Rows decoding together: their requests, one KV cache, the mask over its columns, the next tokens."""

    reqs: list[GenerationRequest]
    cache: Any
    mask: torch.Tensor | None     # [B, L] 1 = real token, 0 = left padding; None: rows in a SlotCache
    next_tokens: torch.Tensor     # [B] sampled, not yet fed

    @property
    def size(self) -> int:
        return len(self.reqs)


def cache_layers(cache) -> list:
    return list(getattr(cache, "layers", []))


def cache_joinable(cache) -> bool:
    """Plain full-attention layers can be padded and concatenated; anything else cannot."""
    from transformers.cache_utils import DynamicLayer

    layers = cache_layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer and getattr(layer, "is_initialized", False)
                                and layer.keys is not None and layer.keys.dim() == 4 for layer in layers)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [missing, 0]
    return F.pad(t, pad)


def merge_batches(a: Batch, b: Batch) -> Batch:
    """One batch from two: left pad the shorter cache (masked zeros), concatenate along the batch axis
    (slot-cache rows are already in place: ``b`` was loaded into the slots after ``a``'s)."""
    if a.mask is None:
        return Batch(a.reqs + b.reqs, a.cache, None, torch.cat([a.next_tokens, b.next_tokens]))
    length = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(cache_layers(a.cache), cache_layers(b.cache)):
        la.keys = torch.cat([_pad_left(la.keys, length, 2), _pad_left(lb.keys, length, 2)], 0)
        la.values = torch.cat([_pad_left(la.values, length, 2), _pad_left(lb.values, length, 2)], 0)
    mask = torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)], 0)
    return Batch(a.reqs + b.reqs, a.cache, mask, torch.cat([a.next_tokens, b.next_tokens]))


def select_rows(batch: Batch, keep: list[int]) -> Batch | None:
    """Keep some rows; drop cache columns that are padding for all of them."""
    if not keep:
        return None
    if len(keep) == batch.size:
        return batch
    idx = torch.tensor(keep, device=batch.next_tokens.device)
    reqs = [batch.reqs[i] for i in keep]
    if batch.mask is None:  # slots: compact, copying columns up to the longest kept row
        batch.cache.keep(keep, max(len(r.prompt_ids) + len(r.generated) for r in reqs))
        return Batch(reqs, batch.cache, None, batch.next_tokens.index_select(0, idx))
    mask = batch.mask.index_select(0, idx)
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else 0
    mask = mask[:, first:]
    for layer in cache_layers(batch.cache):
        layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
        layer.values = layer.values.index_select(0, idx)[:, :, first:]
    return Batch(reqs, batch.cache, mask, batch.next_tokens.index_select(0, idx))
