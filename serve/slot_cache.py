"""A static KV cache for a continuous batch, and decode steps replayed from CUDA graphs.

Why not Hugging Face's ``StaticCache``: it writes every row of a step at one shared column, so rows of
different lengths must be aligned (left padded and shifted as requests come and go). Here each running
request owns a *slot* (a row of a preallocated ``[slots, kv_heads, capacity, head_dim]`` buffer per layer)
and keeps its tokens at columns ``0 .. length-1``: a decode step writes each row's new key and value at
that row's own position, so joining and leaving never moves the other rows' columns.

Running rows occupy slots ``0 .. n-1`` (leaving rows are compacted away). A step runs the first ``b`` slots
(``b``: ``n`` rounded up to a power of two; spare rows compute on padding and are ignored) over the first
``c`` columns (``c``: the longest row rounded up to a power of two, at most the capacity), with a 4D
additive mask built from the positions inside the step. On CUDA each ``(b, c)`` step is captured once as
a CUDA graph (memory pool shared by all of them) and replayed: the host launches one graph instead of
hundreds of kernels. Elsewhere the same step runs eagerly, which is what the CPU tests exercise.

New requests are prefilled together, right padded, into a transformers ``DynamicCache`` whose columns are
then copied into their slots (:meth:`SlotDecoder.prefill`); on CUDA prefills of up to
``PREFILL_GRAPH_TOKENS`` padded tokens replay a graph per (rows, length) from the same pool.

The cache is duck-typed for the model's attention layers (``update``, ``get_seq_length``) and the mask is
passed ready-made (transformers uses a 4D mask as is), so no transformers cache internals are relied on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

MIN_COLUMNS = 128
WARMUP_COLUMNS = 1024   # graphs for every rows bucket up to this many columns are captured before serving
MIN_PREFILL_LENGTH = 16     # prompts are right padded to a power of two from here (one prefill graph per length)
PREFILL_GRAPH_TOKENS = 2048  # rows x padded length of the prefills replayed from graphs; longer ones run eagerly
HELD_PREFILL_BYTES = 2 << 30  # output K/V the captured prefills may hold together (least recently used dropped)


def pow2_at_least(n: int, floor: int, ceiling: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return min(size, ceiling)


def cache_bytes(layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for ``slots`` rows of ``capacity`` tokens."""
    return 2 * layers * slots * kv_heads * capacity * head_dim * torch.empty(0, dtype=dtype).element_size()


class SlotCache:
    """Per-layer K/V buffers with one slot per running request; see the module docstring."""

    def __init__(self, layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.capacity = slots, capacity
        self._rows, self._cols = slots, capacity
        self._index: torch.Tensor | None = None

    def bind(self, rows: int, cols: int, positions: torch.Tensor) -> None:
        """Set what the next forward's ``update`` calls read and write: the first ``rows`` slots, the first
        ``cols`` columns, and each row's write column (``positions``, [rows, 1])."""
        self._rows, self._cols = rows, cols
        k = self.keys[0]
        self._index = positions.view(rows, 1, 1, 1).expand(rows, k.shape[1], 1, k.shape[3])

    # the two methods transformers' attention layers call on ``past_key_values``
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k = self.keys[layer_idx][:self._rows, :, :self._cols]
        v = self.values[layer_idx][:self._rows, :, :self._cols]
        k.scatter_(2, self._index, key_states)
        v.scatter_(2, self._index, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def load(self, first_slot: int, dynamic_cache, columns: int) -> None:
        """Copy prefilled rows (a right-padded transformers ``DynamicCache``: each row's tokens at columns
        ``0 .. length-1``) into slots from ``first_slot``. The first ``columns`` columns are copied whole:
        what a row holds past its length is never read (a decode step masks columns past its position) and is
        overwritten as it grows."""
        for layer, (ks, vs) in enumerate(zip(self.keys, self.values)):
            src = dynamic_cache.layers[layer]
            rows = src.keys.shape[0]
            ks[first_slot:first_slot + rows, :, :columns] = src.keys[:, :, :columns]
            vs[first_slot:first_slot + rows, :, :columns] = src.values[:, :, :columns]

    def keep(self, rows: list[int], columns: int, first: int = 0) -> None:
        """Compact: slot ``first + j`` takes old slot ``first + rows[j]`` (``rows`` ascending); only the first
        ``columns`` columns are copied (nothing beyond the longest kept row is ever read)."""
        if rows == list(range(len(rows))):
            return
        idx = torch.tensor(rows, device=self.keys[0].device) + first
        for t in self.keys + self.values:
            t[first:first + len(rows), :, :columns] = t[:, :, :columns].index_select(0, idx)

    def from_slot(self, first: int) -> SlotRange:
        """The slots from ``first`` on, as a batch of their own (a prefilled group before it joins)."""
        return SlotRange(self, first)


class SlotRange:
    """Slots ``first ..`` of a :class:`SlotCache`: ``keep`` compacts within them, leaving earlier slots alone."""

    def __init__(self, cache: SlotCache, first: int):
        self.cache, self.first = cache, first

    def keep(self, rows: list[int], columns: int) -> None:
        self.cache.keep(rows, columns, self.first)


class SlotDecoder:
    """Decode steps over a :class:`SlotCache`: eager, or one CUDA graph per (rows, columns) bucket."""

    def __init__(self, model: torch.nn.Module, cache: SlotCache, graphs: bool, logits_to_keep: bool = True):
        self.model, self.cache, self.graphs = model, cache, graphs
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        slots = cache.slots
        self._ids = torch.zeros((slots, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((slots, 1), dtype=torch.long, device=self.device)
        self._columns = torch.arange(cache.capacity, device=self.device)
        self._kwargs = {"logits_to_keep": 1} if logits_to_keep else {}
        from maskpro.models import cache_kwarg

        self._cache_kw = cache_kwarg(model)
        self._steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self._prefills: dict[tuple[int, int], Callable[[], tuple[torch.Tensor, object]]] = {}  # in LRU order
        self._prefill_seen: dict[tuple[int, int], int] = {}
        self._bytes_per_token = cache_bytes(len(cache.keys), 1, 1, cache.keys[0].shape[1], cache.keys[0].shape[3],
                                            cache.keys[0].dtype)
        self.prefill_graphs = graphs
        self.prefill_graph_tokens = PREFILL_GRAPH_TOKENS  # rows x padded length replayed from graphs
        self.prefills_captured = 0
        self._pool = None
        if graphs:
            with torch.cuda.device(self.device):
                self._pool = torch.cuda.graph_pool_handle()
        self.captured = 0
        self.capture_failed: str | None = None

    def buckets(self, rows: int, longest: int) -> tuple[int, int]:
        """The (rows, columns) a step for ``rows`` running rows whose longest has ``longest`` tokens runs at."""
        return (pow2_at_least(rows, 1, self.cache.slots),
                pow2_at_least(longest, min(MIN_COLUMNS, self.cache.capacity), self.cache.capacity))

    def _forward(self, rows: int, cols: int) -> torch.Tensor:
        pos = self._pos[:rows]
        blocked = self._columns[:cols].view(1, cols) > pos                      # [rows, cols]
        mask = torch.zeros(blocked.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(blocked, torch.finfo(self.dtype).min).view(rows, 1, 1, cols)
        self.cache.bind(rows, cols, pos)
        out = self.model(input_ids=self._ids[:rows], attention_mask=mask, position_ids=pos,
                         use_cache=True, **{self._cache_kw: self.cache}, **self._kwargs)
        return out.logits[:, -1, :]

    def _capture(self, rows: int, cols: int) -> Callable[[], torch.Tensor]:
        """Warm up on a side stream (the step is idempotent: it rewrites the same K/V), capture, return replay."""
        with torch.cuda.device(self.device):
            return self._capture_here(rows, cols)

    def _graph_of(self, fn: Callable[[], object], warmups: int) -> tuple[torch.cuda.CUDAGraph, object]:
        """``fn`` captured in a CUDA graph from the shared pool, after ``warmups`` eager calls on a side stream;
        returns the graph and the output tensors it rewrites at each replay."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        return graph, out

    def _capture_here(self, rows: int, cols: int) -> Callable[[], torch.Tensor]:
        graph, logits = self._graph_of(lambda: self._forward(rows, cols), warmups=2)
        self.captured += 1
        log.info("captured a decode graph for %d rows x %d columns (%d so far)", rows, cols, self.captured)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits
        return replay

    def warmup(self, max_columns: int = WARMUP_COLUMNS) -> int:
        """Capture the steps of every rows bucket up to ``max_columns`` columns, and one-row prefills of every
        length, before any request runs (the first requests would otherwise pay the captures); only while no
        slot is in use. Returns graphs captured."""
        if not self.graphs:
            return 0
        rows = sorted({self.buckets(1 << i, 1)[0] for i in range(self.cache.slots.bit_length() + 1)})
        cols = sorted({self.buckets(1, 1 << i)[1] for i in range(max_columns.bit_length())})
        for r in rows:
            for c in cols:
                if self.graphs:
                    self.step(torch.zeros(r, dtype=torch.long, device=self.device), [0] * (r - 1) + [c - 1])
        length = min(MIN_PREFILL_LENGTH, self.cache.capacity)
        while self.prefill_graphs and length <= min(PREFILL_GRAPH_TOKENS, self.cache.capacity):
            for _ in range(2):  # one request's prefill at every length (the common case), seen twice: captured
                self.prefill([[0] * length], 0, 0)
            length *= 2
        return self.captured + self.prefills_captured

    def step(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Feed each running row (slot ``i`` = row ``i``) its token at its position; float32 logits [n, vocab]."""
        n = tokens.shape[0]
        rows, cols = self.buckets(n, max(positions) + 1)
        self._ids[:n, 0] = tokens
        self._pos[:n, 0] = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        if rows > n:  # spare rows write column 0 of slots nobody uses
            self._ids[n:rows] = 0
            self._pos[n:rows] = 0
        if not self.graphs:
            return self._forward(rows, cols)[:n].float()
        run = self._steps.get((rows, cols))
        if run is None:
            try:
                run = self._steps[(rows, cols)] = self._capture(rows, cols)
            except Exception as e:  # noqa: BLE001 - keep serving eagerly, say why once
                self.capture_failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", self.capture_failed)
                torch.cuda.synchronize(self.device)
                self.graphs = False
                return self._forward(rows, cols)[:n].float()
        return run()[:n].float()

    # ------------------------------------------------------------------------------------------- prefill
    def prefill(self, prompts: list[list[int]], first_slot: int, pad_id: int) -> torch.Tensor:
        """Prefill ``prompts`` into slots ``first_slot ..``; float32 logits at each row's last token [n, vocab].

        Rows are right padded to a power-of-two length, so each row's tokens sit at columns ``0 .. len-1`` of
        its slot, as decode expects, and plain causal attention is exact for them (padding only follows real
        tokens): no padding mask, so the attention kernel's causal path runs. On CUDA a prefill of up to
        ``PREFILL_GRAPH_TOKENS`` padded tokens replays a graph captured once per (rows, length): eagerly, the
        host's launch work for every layer costs as much as the GPU's work at these sizes (docs/serving.md).
        """
        ids, last, run = self._padded(prompts, first_slot, pad_id)
        if run is None:
            logits, kv = self._prefill_forward(ids.to(self.device), last.to(self.device))
        else:
            logits, kv = run(ids, last)
        self.cache.load(first_slot, kv, ids.shape[1])
        return logits[:len(prompts)].float()

    def _padded(self, prompts: list[list[int]], first_slot: int, pad_id: int):
        """(ids [rows, length] on the host, each row's last position, the captured prefill or None): prompts
        right padded to a power-of-two length, and with graphs to a power-of-two number of rows (into free
        slots) too, so fewer shapes are captured."""
        n, longest = len(prompts), max(map(len, prompts))
        length = pow2_at_least(longest, min(MIN_PREFILL_LENGTH, self.cache.capacity), self.cache.capacity)
        run = None
        if self.prefill_graphs:
            rows = min(pow2_at_least(n, 1, self.cache.slots), self.cache.slots - first_slot)
            if rows * length <= self.prefill_graph_tokens:
                run = self._prefill_graph(rows, length)
                prompts = prompts + [[pad_id]] * (rows - n) if run is not None else prompts
        ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        return ids, torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long), run

    def _prefill_forward(self, ids: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, object]:
        from transformers import DynamicCache

        kv = DynamicCache(config=self.model.config)
        if self._kwargs:  # logits at the rows' last positions only: [n, n, vocab], row i's own at [i, i]
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=last, **{self._cache_kw: kv})
            return out.logits.diagonal(dim1=0, dim2=1).t(), kv
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: kv})
        return out.logits[torch.arange(ids.shape[0], device=ids.device), last], kv

    def _prefill_graph(self, rows: int, length: int):
        """The captured prefill of (rows, length), captured the second time that shape is asked for (a shape
        seen once runs eagerly rather than pay a capture); None where there is none yet or capture failed
        (then every prefill runs eagerly from now on)."""
        key = (rows, length)
        run = self._prefills.pop(key, None)
        if run is None:
            self._prefill_seen[key] = seen = self._prefill_seen.get(key, 0) + 1
            if seen < 2:
                return None
            try:
                with torch.cuda.device(self.device):
                    run = self._capture_prefill(rows, length)
            except Exception as e:  # noqa: BLE001 - keep serving with eager prefill, say why once
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.warning("prefill graph capture failed (%s); prefill runs eagerly from now on", why)
                torch.cuda.synchronize(self.device)
                self.prefill_graphs = False
                return None
            held = HELD_PREFILL_BYTES // self._bytes_per_token
            while self._prefills and sum(r * c for r, c in self._prefills) + rows * length > held:
                del self._prefills[next(iter(self._prefills))]  # least recently used first
        self._prefills[key] = run
        return run

    def _capture_prefill(self, rows: int, length: int):
        ids = torch.zeros((rows, length), dtype=torch.long, device=self.device)
        last = torch.full((rows,), length - 1, dtype=torch.long, device=self.device)
        graph, (logits, kv) = self._graph_of(lambda: self._prefill_forward(ids, last), warmups=1)
        self.prefills_captured += 1
        log.info("captured a prefill graph for %d rows x %d tokens (%d so far)", rows, length,
                 self.prefills_captured)

        def replay(new_ids: torch.Tensor, new_last: torch.Tensor) -> tuple[torch.Tensor, object]:
            ids.copy_(new_ids)  # the graph reads its inputs from these buffers, which this closure keeps alive
            last.copy_(new_last)
            graph.replay()
            return logits, kv
        return replay
