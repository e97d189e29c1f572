"""Decode steps and prefills of a :class:`~maskpro.serve.fast_model.FastLM` over the slot cache, compiled once
and replayed from CUDA graphs: the serving engine's and ``maskpro-bench generate``'s path for Llama-family
models.

It keeps :class:`~maskpro.serve.slot_cache.SlotDecoder`'s contract (slots, buckets, warm-up, prefill graphs
per (rows, length), least recently used dropped), with three differences:
- a step's graph depends on its rows only: attention reads each row's own length from a device tensor, so the
  columns need no buckets;
- the decoder block is compiled with ``torch.compile`` (one compiled function for every block, so compiling
  costs one block, not the model), and inductor's caches live in a folder kept across restarts;
- a prefill writes its K/V straight into the slots named by a device tensor, so one captured prefill serves
  any free slots.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .fast_model import FastLM, block_decode, block_prefill
from .slot_cache import SlotCache, SlotDecoder, pow2_at_least

log = logging.getLogger(__name__)


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels and graphs between processes (``MASKPRO_COMPILE_CACHE``, default
    ``~/.cache/maskpro/inductor``), so a restart reuses them instead of compiling again."""
    return Path(os.environ.get("MASKPRO_COMPILE_CACHE", Path.home() / ".cache" / "maskpro" / "inductor"))


def compile_blocks(fast: FastLM) -> None:
    """Replace the decoder block by its compiled form (traced at the first step of each rows bucket)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    import torch._dynamo

    # one compiled block per rows bucket (1, 2, 4, ... slots): more than dynamo keeps by default
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fast.block_fn = torch.compile(block_decode, fullgraph=True, dynamic=False)
    # prefill: compiled per (rows, length) shape; compiled for dynamic shapes, inductor's elementwise kernels run
    # far below the bandwidth (docs/runtime.md)
    fast.prefill_fn = torch.compile(block_prefill, fullgraph=True, dynamic=False)


class FastDecoder(SlotDecoder):
    """Decode and prefill of a :class:`FastLM` over a :class:`SlotCache` (see module doc)."""

    def __init__(self, fast: FastLM, cache: SlotCache, graphs: bool, compile: bool = True):
        self.fast = fast
        super().__init__(_ParamsOf(fast), cache, graphs)
        self._rows = torch.arange(cache.slots, device=self.device)
        self._slots = torch.arange(cache.slots, device=self.device)
        self.compiled = compile and self.device.type == "cuda"
        self.compile_s = 0.0
        if self.compiled:
            compile_blocks(fast)

    def buckets(self, rows: int, longest: int) -> tuple[int, int]:
        return pow2_at_least(rows, 1, self.cache.slots), self.cache.capacity

    def _forward(self, rows: int, cols: int) -> torch.Tensor:
        self.fast.configure(rows)
        return self.fast.decode(self._ids[:rows, 0], self._rows[:rows], self._pos[:rows, 0], self.cache.keys,
                                self.cache.values)

    def _capture_here(self, rows: int, cols: int):
        t0 = time.perf_counter()
        self._forward(rows, cols)  # traces and compiles this bucket outside the capture
        torch.cuda.synchronize(self.device)
        self.compile_s += time.perf_counter() - t0
        return super()._capture_here(rows, cols)

    def prefill(self, prompts: list[list[int]], first_slot: int, pad_id: int) -> torch.Tensor:
        """Prefill ``prompts`` into slots ``first_slot ..``; float32 logits at each row's last token [n, vocab]."""
        ids, last, run = self._padded(prompts, first_slot, pad_id)
        slots = torch.arange(first_slot, first_slot + ids.shape[0])
        if run is None:
            logits = self._prefill_forward(ids.to(self.device), last.to(self.device), slots.to(self.device))
        else:
            logits = run(ids, last, slots)
        return logits[:len(prompts)].float()

    def _prefill_forward(self, ids: torch.Tensor, last: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.fast.prefill(ids, last, slots, self.cache.keys, self.cache.values)

    def _capture_prefill(self, rows: int, length: int):
        ids = torch.zeros((rows, length), dtype=torch.long, device=self.device)
        last = torch.full((rows,), length - 1, dtype=torch.long, device=self.device)
        slots = self._slots[-rows:].clone()  # the warm-up and capture write the last slots, which are free then
        graph, logits = self._graph_of(lambda: self._prefill_forward(ids, last, slots), warmups=1)
        self.prefills_captured += 1
        log.info("captured a prefill graph for %d rows x %d tokens (%d so far)", rows, length,
                 self.prefills_captured)

        def replay(new_ids: torch.Tensor, new_last: torch.Tensor, new_slots: torch.Tensor) -> torch.Tensor:
            ids.copy_(new_ids)
            last.copy_(new_last)
            slots.copy_(new_slots)
            graph.replay()
            return logits
        return replay


def for_engine(model: torch.nn.Module, slots: int, capacity: int, dtype: torch.dtype, device: torch.device,
               sparse: bool, graphs: bool) -> tuple[FastDecoder, dict, dict]:
    """The serving engine's decoder: ``model``'s weights taken over (2:4 ones compressed only with ``sparse``,
    planned on a GPU), a slot cache of ``slots`` x ``capacity`` tokens, steps captured before serving.
    Returns (decoder, what the engine reports as its sparsity, what it reports as its KV cache)."""
    from maskpro.errors import MaskproError

    from .config import STATIC_CACHE_SHARE
    from .slot_cache import cache_bytes

    c = model.config
    heads = c.num_attention_heads
    need = cache_bytes(c.num_hidden_layers, slots, capacity, getattr(c, "num_key_value_heads", None) or heads,
                       getattr(c, "head_dim", None) or c.hidden_size // heads, dtype)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if free is not None and need > STATIC_CACHE_SHARE * free:
        raise MaskproError(f"the fast runtime's KV cache for {slots} rows x {capacity} tokens needs "
                           f"{need / 2**30:.1f} GiB, more than half the free {free / 2**30:.1f} GiB; lower "
                           f"--max-batch-size, --max-prompt-tokens or --max-tokens, or use --runtime transformers")
    fast = FastLM.from_hf(model, capacity, sparse=sparse)
    torch.cuda.empty_cache()
    rows = sorted({1 << i for i in range(slots.bit_length()) if 1 << i <= slots} | {slots})
    plan = fast.plan(rows) if sparse and device.type == "cuda" else {}
    info = {"backend": "fast (compiled Llama-family decoder)", "layers": sum(map(len, fast.layers24)),
            "weights_gib": round(fast.weight_bytes() / 2**30, 3), "dense_fallbacks": fast.fallbacks, "plans": plan,
            "prefill_buffers_gib": round(fast.expand_ahead.nbytes() / 2**30, 3) if fast.expand_ahead else 0.0}
    arch = fast.arch
    cache = SlotCache(arch.layers, slots, capacity, arch.kv_heads, arch.head_dim, dtype, device)
    decoder = FastDecoder(fast, cache, graphs and device.type == "cuda")
    t0 = time.perf_counter()
    with torch.inference_mode():
        decoder.warmup()
    log.info("fast runtime: %d 2:4 layers, %.2f GiB of weights; static KV cache %d slots x %d tokens, %.2f GiB; "
             "decode %s", info["layers"], fast.weight_bytes() / 2**30, slots, capacity, need / 2**30,
             f"compiled and from CUDA graphs ({decoder.captured} captured in {time.perf_counter() - t0:.1f} s)"
             if decoder.graphs else "eager")
    return decoder, info, {"kind": "static", "slots": slots, "capacity_tokens": capacity,
                           "gib": round(need / 2**30, 3), "runtime": "fast"}


class _ParamsOf(torch.nn.Module):
    """What :class:`SlotDecoder` reads of its model (device and dtype of the first parameter)."""

    def __init__(self, fast: FastLM):
        super().__init__()
        self.embed = torch.nn.Parameter(fast.embed, requires_grad=False)
