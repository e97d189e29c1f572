"""Embedded torch backend: one worker thread owns the model and batches requests at every decode step.

Scheduling (iteration-level / continuous batching, left padding):

* Requests wait in a bounded FIFO (``max_queue``; a full queue is a 429 for the client).
* Every iteration the worker first admits waiting requests while the running batch has room
  (``max_batch_size``) and the padded prefill stays within ``prefill_tokens``. The admitted group is
  prefilled together (left padded, attention mask, position ids from the mask) into its own
  ``DynamicCache``, its first tokens are sampled, and it joins the running batch: the shorter of the two
  caches is left padded with zeros (masked out) and the caches are concatenated along the batch axis
  (:mod:`maskpro.serve.batch`).
* Then one decode step feeds every running row (newcomers included) its last token with explicit per-row
  position ids, so rows of different lengths share one forward pass. Finished, cancelled or timed-out rows
  leave the batch after the step (batch index select), and cache columns that are padding for every
  remaining row are cut off.
* Models whose cache is not made of plain full-attention layers (sliding-window or linear-attention
  layers) cannot be merged this way; for them new requests join only when the batch is empty
  (static batching, still batched).

With a static slot cache (:mod:`maskpro.serve.loading` decides which cache a model gets) an admitted group
is prefilled right padded into a ``DynamicCache`` whose rows are then copied into their slots (a CUDA graph
per (rows, length) up to ``slot_cache.PREFILL_GRAPH_TOKENS`` padded tokens, else eagerly), and each decode
step replays a CUDA graph captured once per (rows, columns) bucket.

Text leaves the worker as deltas (:mod:`maskpro.serve.streaming`), each request's to its own queue
(:mod:`maskpro.serve.request`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections import deque
from typing import Sequence

import torch

from .batch import Batch, cache_joinable, cache_layers, merge_batches, select_rows
from .config import EngineConfig
from .faults import MAX_FAILED_STEPS, ForwardOutOfMemory, forward_memory, is_sticky
from .loading import cuda_graphs_info, load_model, logits_width
from .prompts import PromptEncoder
from .protocol import (
    ClientCancelledError,
    Completion,
    OutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
    ServeError,
    UnavailableError,
)
from .request import EventSink, GenerationRequest, RequestHandle, admitted_max_tokens
from .sampling import sample
from .streaming import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

__all__ = ["TorchEngine"]


def _rss() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class TorchEngine:
    """A Hugging Face causal LM served from one worker thread with continuous batching (see module doc)."""

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        m = load_model(config)
        self.path, self.device, self.dtype, self.runtime = m.path, m.device, m.dtype, m.runtime
        self.tokenizer, self.model = m.tokenizer, m.model
        self.sparsity, self.load_s, self.maskpro_meta = m.sparsity, m.load_s, m.maskpro_meta
        self.model_id = config.served_model_name or self.path.name
        self.max_context, self.max_prompt_tokens = m.max_context, m.max_prompt_tokens
        self.eos_ids, self.pad_id = m.eos_ids, m.pad_id
        self.kv_cache = m.kv_cache
        self._decode_tokenizer = m.decode_tokenizer  # the worker's own copy (see maskpro.serve.prompts)
        self._prompts = PromptEncoder(self.tokenizer, self.model.config.get_text_config(decoder=True).vocab_size,
                                      self.model_id)
        self._logits_to_keep, self._cache_kw, self._decoder = m.logits_to_keep, m.cache_kw, m.decoder
        self._lock = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._batch: Batch | None = None
        self._prefilling: list[GenerationRequest] = []
        self._joinable: bool | None = True if self._decoder is not None else None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._abort_at: float | None = None
        self._running = 0
        self._steps = 0
        self._dead: str | None = None  # why the worker stopped for good (a sticky device error)
        self._batched_steps = 0        # decode steps that ran more than one request together
        self._max_rows = 0             # the most requests one decode step ran
        self._outcomes: dict[str, int] = {}   # finish reasons and error codes -> count
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------------------------- reporting
    def info(self) -> dict:
        """What /health and /v1/models report about the loaded model."""
        return {"model": self.model_id, "path": str(self.path), "backend": "torch", "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "max_context": self.max_context,
                "max_prompt_tokens": self.max_prompt_tokens, "max_new_tokens": self.config.max_new_tokens,
                "max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue,
                "sparsity": self.sparsity, "maskpro": self.maskpro_meta, "kv_cache": self.kv_cache,
                "cuda_graphs": cuda_graphs_info(self._decoder, self.config, self.device, self.kv_cache),
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None, "load_s": self.load_s}

    def stats(self) -> dict:
        return {"queue_depth": len(self._waiting), "running": self._running, "steps": self._steps,
                "batched_steps": self._batched_steps, "max_rows": self._max_rows, "memory_bytes": self._memory(),
                "host_memory_bytes": _rss(), "outcomes": self._outcomes.copy(), **({"stopped": self._dead} if self._dead else {})}

    def _memory(self) -> int:
        """Device memory held by tensors on a GPU, else this process's resident memory (what a soak watches)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _rss()

    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing and self._dead is None

    # --------------------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids for /v1/completions: text is tokenized with the tokenizer's special tokens (BOS)."""
        return self._prompts.encode_prompt(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids for /v1/chat/completions through the tokenizer's chat template."""
        return self._prompts.encode_chat(messages)

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="maskpro-engine", daemon=True)
        self._thread.start()

    def begin_shutdown(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, fail queued ones (503), let running ones finish for ``grace_s`` seconds."""
        with self._lock:
            if self._closing and self._abort_at is not None and self._abort_at <= time.monotonic() + grace_s:
                return
            self._closing = True
            self._abort_at = time.monotonic() + max(0.0, grace_s)
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify_all()
        for req in waiting:
            self._end(req, UnavailableError("the server is shutting down; retry on another instance"))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut down now (in-flight requests end with 503) and join the worker thread."""
        self.begin_shutdown(0.0)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --------------------------------------------------------------------------------------- submit
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, default_max_tokens: int | None = None,
               param_prompt: str = "prompt", loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises a ServeError (400/429/503) when it cannot be accepted.

        Events go to an asyncio queue of ``loop`` (default: the running loop, if any), else to a thread
        queue for synchronous iteration.
        """
        max_tokens = admitted_max_tokens(len(prompt_ids), params, max_prompt_tokens=self.max_prompt_tokens,
                                         max_context=self.max_context, max_new_tokens=self.config.max_new_tokens,
                                         default_max_tokens=default_max_tokens, param_prompt=param_prompt)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        req = GenerationRequest(list(prompt_ids), params, max_tokens, EventSink(loop),
                                time.monotonic() + self.config.request_timeout_s)
        with self._lock:
            if self._dead is not None:
                raise UnavailableError(f"the engine stopped ({self._dead}); the server must be restarted")
            if self._closing or self._thread is None or not self._thread.is_alive():
                raise UnavailableError("the server is shutting down or not started")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (limit "
                                     f"{self.config.max_queue}); retry later")
            self._waiting.append(req)
            self._lock.notify_all()
        return RequestHandle(req)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Completion:
        """Blocking convenience: one completion for a prompt (text or ids)."""
        ids = self.encode_prompt(prompt)
        handle = self.submit(ids, params or SamplingParams(), loop=None)
        return handle.result()

    # --------------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        failures = 0
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while (not self._waiting and self._batch is None and not self._closing):
                            self._lock.wait(0.25)
                        if self._closing and not self._waiting and self._batch is None:
                            break
                    self._abort_if_due()
                    try:
                        self._step()
                        failures = 0
                    except Exception as e:  # a bug: fail what was in flight, keep serving unless it sticks
                        log.exception("engine step failed")
                        failures += 1
                        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        self._fail_all(ServeError(f"generation failed: {reason}"))
                        if is_sticky(e) or failures >= MAX_FAILED_STEPS:
                            self._dead = reason
                            break
        except BaseException as e:  # the worker itself broke: nothing may wait for it
            self._dead = self._dead or f"{type(e).__name__}: {e}"
            raise
        finally:
            self._running = 0
            if self._dead is not None:
                self._die()

    def _die(self) -> None:
        """The worker stopped for good: /health turns 503 and every request, queued or new, gets a 503."""
        log.error("engine worker stopped: %s; /health reports 503, restart the server", self._dead)
        error = UnavailableError(f"the engine stopped ({self._dead}); the server must be restarted")
        self._fail_all(error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            self._end(req, error)

    def _end(self, req: GenerationRequest, error: ServeError) -> None:
        if req.fail(error):
            self._count(error.code or "error")

    def _count(self, outcome: str) -> None:
        with self._count_lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def _abort_if_due(self) -> None:
        if self._closing and self._abort_at is not None and time.monotonic() >= self._abort_at:
            self._fail_all(UnavailableError("the server shut down before this request finished"))

    def _fail_all(self, error: ServeError) -> None:
        for req in (self._batch.reqs if self._batch is not None else []) + self._prefilling:
            self._end(req, error)
        self._batch = None
        self._prefilling = []
        self._running = 0

    def _admit(self) -> list[GenerationRequest]:
        now = time.monotonic()
        taken: list[GenerationRequest] = []
        running = self._batch.size if self._batch is not None else 0
        if self._joinable is False and running:
            return taken
        with self._lock:
            kept: deque[GenerationRequest] = deque()
            while self._waiting:
                req = self._waiting.popleft()
                if req.cancelled.is_set():
                    self._end(req, ClientCancelledError("cancelled by the client"))
                    continue
                if now >= req.deadline:
                    self._end(req, RequestTimeoutError(f"the request waited more than "
                                                       f"{self.config.request_timeout_s:g} s for a batch slot"))
                    continue
                longest = max([len(r.prompt_ids) for r in taken] + [len(req.prompt_ids)])
                fits = (running + len(taken) < self.config.max_batch_size
                        and (not taken or longest * (len(taken) + 1) <= self.config.prefill_tokens))
                (taken if fits else kept).append(req)
            self._waiting = kept
        return taken

    def _step(self) -> None:
        """Admit and prefill newcomers (their first token), then one decode step for the whole batch, so
        admissions never stall the rows already running."""
        new = self._admit()
        if new:
            self._join(new)
        while self._batch is not None:
            self._batched_steps += self._batch.size > 1
            self._max_rows = max(self._max_rows, self._batch.size)
            try:
                self._decode()
                break
            except ForwardOutOfMemory:
                pass  # shed outside the handler, which still holds the failed step's tensors
            self._shed_largest()
        self._running = self._batch.size if self._batch is not None else 0
        self._steps += 1

    def _join(self, new: list[GenerationRequest]) -> None:
        """Prefill newcomers and add them to the batch. When the model's forward runs out of memory, a group is
        retried one request at a time, so only a request that does not fit alone fails; the running rows are
        never touched. Until the group is in the batch it stays in ``_prefilling``, which a failure fails."""
        self._prefilling = new
        try:
            group = self._prefill(new) if self._decoder is None else self._prefill_slots(new)
        except ForwardOutOfMemory:
            group = ForwardOutOfMemory  # recover outside the handler, which still holds the failed tensors
        if group is ForwardOutOfMemory:
            self._free_memory()
            if len(new) == 1:
                self._prefilling = []
                self._end(new[0], OutOfMemoryError(f"out of device memory while reading this "
                                                   f"{len(new[0].prompt_ids)}-token prompt beside the requests "
                                                   "running now; retry later or send a shorter prompt"))
                return
            for i, r in enumerate(new):
                try:
                    self._join([r])
                except Exception:
                    self._prefilling = new[i:]  # the rest are failed with it, none left waiting
                    raise
            return
        if group is not None:
            self._batch = group if self._batch is None else merge_batches(self._batch, group)
        self._prefilling = []

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _shed_largest(self) -> None:
        """A decode step ran out of memory: fail the row holding the longest context, keep the others (their
        cache is cut back to before the step, which may have written some layers), and let the step retry."""
        batch = self._batch
        if batch.mask is not None:
            for layer in cache_layers(batch.cache):
                layer.keys = layer.keys[:, :, :batch.mask.shape[1]]
                layer.values = layer.values[:, :, :batch.mask.shape[1]]
        self._free_memory()
        sizes = [len(r.prompt_ids) + len(r.generated) for r in batch.reqs]
        victim = max(range(batch.size), key=sizes.__getitem__)
        self._end(batch.reqs[victim], OutOfMemoryError(
            f"out of device memory at {sizes[victim]} tokens of context with {batch.size - 1} other requests "
            "running; retry later, or ask for fewer tokens"))
        log.warning("decode step out of memory: failed the request with %d tokens of context, %d others go on",
                    sizes[victim], batch.size - 1)
        self._batch = select_rows(batch, [i for i in range(batch.size) if i != victim])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with forward_memory():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_kw: cache}, **kwargs)
            return out.logits[:, -1, :].float()

    def _prefill(self, reqs: list[GenerationRequest]) -> Batch | None:
        from transformers import DynamicCache

        length = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), length), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, length - len(r.prompt_ids):] = 1
            self._init_request(r)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        if self._joinable is None:
            self._joinable = cache_joinable(cache)
            if not self._joinable:
                log.warning("this model's KV cache is not plain full attention: new requests join only an "
                            "empty batch (static batching)")
        batch = Batch(list(reqs), cache, mask, torch.zeros(len(reqs), dtype=torch.long, device=self.device))
        return self._sample_and_emit(batch, logits)

    def _prefill_slots(self, reqs: list[GenerationRequest]) -> Batch | None:
        """Prefill into the slots after the running rows (from a CUDA graph where one fits), sample the first
        tokens; rows that finish at once are compacted away within the group's slots."""
        for r in reqs:
            self._init_request(r)
        first = self._batch.size if self._batch is not None else 0
        with forward_memory():
            logits = self._decoder.prefill([r.prompt_ids for r in reqs], first, self.pad_id)
        group = Batch(list(reqs), self._decoder.cache.from_slot(first), None,
                      torch.zeros(len(reqs), dtype=torch.long, device=self.device))
        group = self._sample_and_emit(group, logits)
        return None if group is None else Batch(group.reqs, self._decoder.cache, None, group.next_tokens)

    def _decode(self) -> None:
        batch = self._batch
        if self._decoder is not None:
            positions = [len(r.prompt_ids) + len(r.generated) - 1 for r in batch.reqs]
            with forward_memory():
                logits = self._decoder.step(batch.next_tokens, positions)
            self._batch = self._sample_and_emit(batch, logits)
            return
        positions = torch.tensor([[len(r.prompt_ids) + len(r.generated) - 1] for r in batch.reqs],
                                 dtype=torch.long, device=self.device)
        mask = torch.cat([batch.mask, torch.ones((batch.size, 1), dtype=batch.mask.dtype, device=self.device)], 1)
        logits = self._forward(batch.next_tokens[:, None], mask, positions, batch.cache)
        batch.mask = mask
        self._batch = self._sample_and_emit(batch, logits)

    def _init_request(self, r: GenerationRequest) -> None:
        r.detok = IncrementalDetokenizer(self._decode_tokenizer)
        r.stops = StopMatcher(r.params.stop)
        if r.params.temperature > 0:
            seed = r.params.seed if r.params.seed is not None else secrets.randbits(63)
            r.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if r.params.presence_penalty or r.params.frequency_penalty:
            r.counts = torch.zeros(logits_width(self.model), dtype=torch.float32, device=self.device)

    def _sample_and_emit(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        now = time.monotonic()
        keep: list[int] = []
        batch.next_tokens = sample(batch.reqs, logits)
        for i, (r, token) in enumerate(zip(batch.reqs, batch.next_tokens.tolist())):
            if r.cancelled.is_set():
                self._end(r, ClientCancelledError("cancelled by the client"))
            if r.done:
                continue
            if now >= r.deadline:
                self._end(r, RequestTimeoutError(f"the request took more than {self.config.request_timeout_s:g} s"))
                continue
            if r.accept(token, self.eos_ids, self.max_context):
                keep.append(i)
            else:
                self._count(r.finish_reason)
        return select_rows(batch, keep)
