"""Prefill from compressed 2:4 weights: each block's layers expanded to dense one block ahead, on a side stream.

Why: prefill is compute-bound, and cuBLAS on a dense weight beats this project's 2:4 GEMM there
(docs/runtime.md), but a model that holds only compressed weights must first expand each layer: a read of the
compressed and a write of the dense bytes, memory-bound work. Done in line, before each product, the expansions
add up to a large share of the time to first token. Here block ``i + 1``'s layers are expanded while block ``i``
multiplies, so the memory-bound expansion runs beside compute-bound products. It holds two sets of buffers of
one block each: the dense bytes of two blocks, never of the model.

Order: before the side stream refills a set it waits for everything the main stream has queued (which includes
the block that last read that set), and the main stream waits for a set's expansion before the block that reads
it. Both are stream and event dependencies, so a CUDA graph captures them: the side stream forks from the capture
stream and joins it again at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .sparse_ops import expand_into


class ExpandAhead:
    """Double-buffered dense copies of each block's 2:4 layers for prefill (see module doc).

    ``layers24`` is :class:`~maskpro.serve.fast_model.FastLM`'s list of {name: Weight24} per block. Layers whose
    plan picked the ``mma.sp`` GEMM for prefill (``Weight24.prefill``) keep it and get no buffer.
    """

    def __init__(self, layers24: list[dict], device: torch.device):
        sizes: dict[str, tuple[int, torch.dtype]] = {}
        for layers in layers24:
            for key, layer in layers.items():
                numel = layer.out_features * layer.in_features
                sizes[key] = (max(numel, sizes.get(key, (0, None))[0]), layer.dtype)
        # allocated now, before any CUDA graph is captured: growing inside a capture would use the graph's pool
        self.sets = [{key: torch.empty(n, dtype=dtype, device=device) for key, (n, dtype) in sizes.items()}
                     for _ in range(2)]
        self.stream = torch.cuda.Stream(device)
        self.done = [torch.cuda.Event(), torch.cuda.Event()]
        self.enabled = True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.sets for t in s.values())

    def _expand(self, layers: dict, s: int) -> dict:
        """Expand ``layers`` into set ``s`` on the current stream; their specs as dense layers."""
        specs = {}
        for key, layer in layers.items():
            if layer.prefill is not None:  # the plan keeps the mma.sp GEMM for this layer's prefill
                continue
            n = layer.out_features * layer.in_features
            w = self.sets[s][key][:n].view(layer.out_features, layer.in_features)
            specs[key] = ("dense", expand_into(w, layer.tiles, layer.positions), layer.bias)
        return specs

    def blocks(self, blocks: list[dict], layers24: list[dict]) -> Iterator[dict]:
        """Each block's weights in turn, its 2:4 layers replaced by dense views expanded one block ahead. The
        caller must queue block ``i``'s work on the current stream before asking for block ``i + 1``."""
        main = torch.cuda.current_stream()
        specs: list[dict] = [self._expand(layers24[0], 0), {}]   # nothing to hide the first block's expansion behind
        for i, w in enumerate(blocks):
            if i + 1 < len(blocks):
                s = (i + 1) % 2
                self.stream.wait_stream(main)   # set s was last read by block i - 1, queued before this point
                with torch.cuda.stream(self.stream):
                    specs[s] = self._expand(layers24[i + 1], s)
                    self.done[s].record(self.stream)
            if i > 0:
                main.wait_event(self.done[i % 2])
            yield {**w, **specs[i % 2]}
        main.wait_stream(self.stream)   # join, so a captured graph leaves no work of the side stream outside
