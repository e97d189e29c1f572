"""Embedded torch backend: one worker thread owns the model and batches requests at every decode step.

Scheduling (iteration-level / continuous batching, left padding):

* Requests wait in a bounded FIFO (``max_queue``; a full queue is a 429 for the client).
* Every iteration the worker first admits waiting requests while the running batch has room
  (``max_batch_size``) and the padded prefill stays within ``prefill_tokens``. The admitted group is
  prefilled together (left padded, attention mask, position ids from the mask) into its own
  ``DynamicCache``, its first tokens are sampled, and it joins the running batch: the shorter of the two
  caches is left padded with zeros (masked out) and the caches are concatenated along the batch axis.
* Then one decode step feeds every running row (newcomers included) its last token with explicit per-row
  position ids, so rows of different lengths share one forward pass. Finished, cancelled or timed-out rows
  leave the batch after the step (batch index select), and cache columns that are padding for every
  remaining row are cut off.
* Models whose cache is not made of plain full-attention layers (sliding-window or linear-attention
  layers) cannot be merged this way; for them new requests join only when the batch is empty
  (static batching, still batched).

Text leaves the worker as deltas: tokens are detokenized incrementally (an unfinished UTF-8 character is
held back until it completes) and text that may be the start of a stop sequence is held back until it
is known not to be. Each request's deltas go to an ``asyncio.Queue`` through
``loop.call_soon_threadsafe`` (or to a thread queue for synchronous callers).

KV cache and CUDA graphs (``EngineConfig.kv_cache``, ``cuda_graphs``): on a CUDA GPU the running batch
lives in a static per-row slot cache (:mod:`maskpro.serve.slot_cache`): an admitted group is prefilled
right padded into a ``DynamicCache`` whose rows are then copied into their slots (a CUDA graph per
(rows, length) up to ``slot_cache.PREFILL_GRAPH_TOKENS`` padded tokens, else eagerly), and each decode step
replays a CUDA graph captured once per (rows, columns) bucket. On CPU, or for models whose cache is not plain
full attention, the dynamic cache above is used (``kv_cache="static"`` forces slots, eager on CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import logging
import os
import queue as thread_queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from maskpro.errors import MaskproError

from .slot_cache import SlotCache, SlotDecoder, cache_bytes

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "SamplingParams", "TorchEngine", "RequestHandle", "Backend", "Delta", "Finished",
           "Failed", "Completion", "ServeError", "InvalidRequestError", "PromptTooLongError",
           "MaxTokensError", "ModelNotFoundError", "QueueFullError", "RequestTimeoutError", "UnavailableError",
           "OutOfMemoryError",
           "ClientCancelledError",
           "IncrementalDetokenizer", "StopMatcher"]


# ------------------------------------------------------------------------------------------------ errors

class ServeError(Exception):
    """An error the client receives as OpenAI-style JSON; ``status`` is its HTTP status."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(ServeError):
    status, type, code = 400, "invalid_request_error", None


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class MaxTokensError(InvalidRequestError):
    code = "max_tokens_too_large"


class ModelNotFoundError(ServeError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class QueueFullError(ServeError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class RequestTimeoutError(ServeError):
    status, type, code = 504, "timeout_error", "request_timeout"


class UnavailableError(ServeError):
    status, type, code = 503, "service_unavailable_error", "unavailable"


class OutOfMemoryError(UnavailableError):
    """This request did not fit in the device's memory; the others go on."""

    code = "out_of_memory"


class ClientCancelledError(ServeError):
    """The client went away; the terminal event of a cancelled request (nobody reads its status)."""

    status, type, code = 499, "cancelled", "client_closed_request"


# ------------------------------------------------------------------------------------------------ config

KV_CACHES = ("auto", "static", "dynamic")
RUNTIMES = ("auto", "fast", "transformers")
STATIC_CACHE_SHARE = 0.5   # "auto" falls back to the dynamic cache when slots would need more of the free memory


@dataclass
class EngineConfig:
    """How the torch backend loads and schedules; the limits are what clients see as 400/429/504."""

    model: str
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto (fp32 on CPU, bf16/fp16 on CUDA) | fp32 | fp16 | bf16
    sparse: bool = True                # swap linears for the 2:4 runtime (maskpro.serve.sparse_linear)
    max_batch_size: int = 32           # rows in the running decode batch
    max_queue: int = 128               # requests waiting for a batch slot before 429
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_new_tokens: int = 1024         # the largest max_tokens a request may ask for
    default_max_tokens: int = 16       # /v1/completions without max_tokens (OpenAI's default)
    request_timeout_s: float = 300.0   # queue wait + generation, then 504
    prefill_tokens: int = 8192         # padded tokens one prefill group may hold (bounds a step's latency)
    kv_cache: str = "auto"             # auto (static slots on CUDA, else dynamic) | static | dynamic
    cuda_graphs: bool = True           # static cache on CUDA: replay decode steps from CUDA graphs
    runtime: str = "auto"              # auto (fast for Llama-family models on CUDA) | fast | transformers
    threads: int | None = None         # torch intra-op threads on CPU; None leaves torch's setting alone
    served_model_name: str | None = None  # the id clients pass as "model"; default: the folder name

    def validate(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_new_tokens", "default_max_tokens", "prefill_tokens"):
            if int(getattr(self, name)) < 1:
                raise MaskproError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache not in KV_CACHES:
            raise MaskproError(f"unknown kv_cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
        if self.runtime not in RUNTIMES:
            raise MaskproError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if self.runtime == "fast" and self.kv_cache == "dynamic":
            raise MaskproError("runtime 'fast' decodes over the static slot cache; drop kv_cache=dynamic")
        if self.threads is not None and self.threads < 1:
            raise MaskproError(f"threads must be >= 1, got {self.threads}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise MaskproError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if not self.request_timeout_s > 0:
            raise MaskproError(f"request timeout must be > 0 seconds, got {self.request_timeout_s}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics); temperature 0 is greedy."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


# ------------------------------------------------------------------------------------------------ events

@dataclass
class Delta:
    text: str
    completion_tokens: int


@dataclass
class Finished:
    finish_reason: str                 # "stop" (EOS or a stop sequence) | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: ServeError


Event = Delta | Finished | Failed


@dataclass
class Completion:
    """A finished request, for synchronous callers and tests."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    """What :func:`maskpro.serve.server.create_app` needs from an engine."""

    model_id: str
    max_context: int

    def start(self) -> None: ...
    def begin_shutdown(self, grace_s: float) -> None: ...
    def stop(self, timeout_s: float = 30.0) -> None: ...
    def is_ready(self) -> bool: ...
    def info(self) -> dict: ...
    def stats(self) -> dict: ...
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]: ...
    def encode_chat(self, messages: list[dict]) -> list[int]: ...
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, default_max_tokens: int | None = None,
               param_prompt: str = "prompt") -> "RequestHandle": ...


# ------------------------------------------------------------------------------------------ text helpers

class IncrementalDetokenizer:
    """Token ids in, text deltas out, equal in total to ``decode(all ids)``.

    Decoding a single token is wrong for byte-level BPE (one character may span tokens) and for
    SentencePiece (spaces depend on the neighbour), so each step decodes a short window of context tokens
    with and without the new ones and emits the difference; a trailing U+FFFD means an unfinished
    character, and the text waits for the next token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0   # start of the context window
        self.read = 0     # ids[:read] are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD, as a full decode would)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta


class StopMatcher:
    """Finds stop sequences in streamed text and holds back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""      # all text so far (emitted + held)
        self.sent = 0       # len of the emitted part

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit now, whether a stop sequence was hit)."""
        if not self.stops:
            self.text += delta
            self.sent = len(self.text)
            return delta, False
        start = max(0, self.sent - max(len(s) for s in self.stops) + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.sent:cut] if cut > self.sent else ""
            self.text = self.text[:max(cut, self.sent)]
            self.sent = len(self.text)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = max(self.sent, len(self.text) - hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


# --------------------------------------------------------------------------------------------- requests

class _Sink:
    """Where a request's events go: an asyncio queue on its loop, or a thread queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.tqueue: thread_queue.Queue | None = None if loop is not None else thread_queue.Queue()

    def put(self, event: Event) -> None:
        if self.loop is None:
            self.tqueue.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.aqueue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class _Request:
    __slots__ = ("id", "prompt_ids", "params", "max_tokens", "sink", "deadline", "cancelled", "created",
                 "done", "generated", "detok", "stops", "generator", "counts", "finish_reason")

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, sink: _Sink,
                 deadline: float):
        self.id = secrets.token_hex(8)
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.sink = sink
        self.deadline = deadline
        self.cancelled = threading.Event()
        self.created = time.monotonic()
        self.done = False
        self.generated: list[int] = []
        self.detok: IncrementalDetokenizer | None = None
        self.stops: StopMatcher | None = None
        self.generator: torch.Generator | None = None
        self.counts: torch.Tensor | None = None
        self.finish_reason: str | None = None

    def fail(self, error: ServeError) -> bool:
        """End with an error event (once); returns whether this call ended it."""
        if self.done:
            return False
        self.done = True
        self.sink.put(Failed(error))
        return True


class RequestHandle:
    """The caller's side of a request: iterate its events (async or sync) and cancel it."""

    def __init__(self, request: _Request):
        self._req = request
        self.id = request.id
        self.prompt_tokens = len(request.prompt_ids)
        self.max_tokens = request.max_tokens

    def cancel(self) -> None:
        """Stop generating (client went away): the worker drops the row at its next step and ends the
        event stream with ``Failed(ClientCancelledError)`` if it had not ended yet."""
        self._req.cancelled.set()

    async def next_event(self) -> Event:
        return await self._req.sink.aqueue.get()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next_event()
            yield event
            if not isinstance(event, Delta):
                return

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._req.sink.tqueue.get()
            yield event
            if not isinstance(event, Delta):
                return

    def result(self) -> Completion:
        """Block until done (synchronous handles only); raises the request's ServeError."""
        parts = []
        for event in self:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return Completion("".join(parts), event.finish_reason, event.prompt_tokens,
                                  event.completion_tokens)
        raise ServeError("request ended without a result")


# ------------------------------------------------------------------------------------------------ batch

@dataclass
class _Batch:
    """Rows decoding together: their requests, one KV cache, the mask over its columns, the next tokens."""

    reqs: list[_Request]
    cache: Any
    mask: torch.Tensor | None     # [B, L] 1 = real token, 0 = left padding; None: rows in a SlotCache
    next_tokens: torch.Tensor     # [B] sampled, not yet fed

    @property
    def size(self) -> int:
        return len(self.reqs)


def _layers(cache) -> list:
    return list(getattr(cache, "layers", []))


def _cache_joinable(cache) -> bool:
    """Plain full-attention layers can be padded and concatenated; anything else cannot."""
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer and getattr(layer, "is_initialized", False)
                                and layer.keys is not None and layer.keys.dim() == 4 for layer in layers)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [missing, 0]
    return F.pad(t, pad)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch from two: left pad the shorter cache (masked zeros), concatenate along the batch axis
    (slot-cache rows are already in place: ``b`` was loaded into the slots after ``a``'s)."""
    if a.mask is None:
        return _Batch(a.reqs + b.reqs, a.cache, None, torch.cat([a.next_tokens, b.next_tokens]))
    length = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(_layers(a.cache), _layers(b.cache)):
        la.keys = torch.cat([_pad_left(la.keys, length, 2), _pad_left(lb.keys, length, 2)], 0)
        la.values = torch.cat([_pad_left(la.values, length, 2), _pad_left(lb.values, length, 2)], 0)
    mask = torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)], 0)
    return _Batch(a.reqs + b.reqs, a.cache, mask, torch.cat([a.next_tokens, b.next_tokens]))


MAX_FAILED_STEPS = 3  # failed steps in a row after which the engine counts as broken
# CUDA errors after which this process cannot use its device again (the context is lost)
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "illegal instruction", "hardware stack error")


class _ForwardOutOfMemory(Exception):
    """The model's forward pass ran out of device memory (nothing was sampled or emitted yet)."""


@contextlib.contextmanager
def _forward_memory():
    """Mark an out-of-memory error as the forward's, the only place a retry or a shed is safe to follow."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise _ForwardOutOfMemory(str(e).splitlines()[0] if str(e) else "out of memory") from None


def _sticky(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in _STICKY)


def _select(batch: _Batch, keep: list[int]) -> _Batch | None:
    """Keep some rows; drop cache columns that are padding for all of them."""
    if not keep:
        return None
    if len(keep) == batch.size:
        return batch
    idx = torch.tensor(keep, device=batch.next_tokens.device)
    reqs = [batch.reqs[i] for i in keep]
    if batch.mask is None:  # slots: compact, copying columns up to the longest kept row
        batch.cache.keep(keep, max(len(r.prompt_ids) + len(r.generated) for r in reqs))
        return _Batch(reqs, batch.cache, None, batch.next_tokens.index_select(0, idx))
    mask = batch.mask.index_select(0, idx)
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else 0
    mask = mask[:, first:]
    for layer in _layers(batch.cache):
        layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
        layer.values = layer.values.index_select(0, idx)[:, :, first:]
    return _Batch(reqs, batch.cache, mask, batch.next_tokens.index_select(0, idx))


# ----------------------------------------------------------------------------------------------- engine

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaskproError(f"--device {name} asked, but torch sees no CUDA GPU; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise MaskproError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from maskpro.models import parse_dtype

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return parse_dtype(name)


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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from maskpro.models import resolve_model_path

        config.validate()
        self.config = config
        self.path = resolve_model_path(config.model)
        self.device = resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        if config.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.threads)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        # A fast tokenizer is one Rust object behind PyO3 borrow checks: encoding in two threads, or encoding
        # while another thread decodes, can raise "Already borrowed" (huggingface/tokenizers#537). Encoding is
        # serialized by a lock; the worker decodes with its own copy.
        self._encode_lock = threading.Lock()
        self._decode_tokenizer = copy.deepcopy(self.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self.dtype, local_files_only=True)
        self.model = model.to(self.device).eval()
        graphs_wanted = config.cuda_graphs and self.device.type == "cuda" and config.kv_cache != "dynamic"
        self.runtime = self._runtime()
        if self.runtime == "fast":
            self.sparsity = {"backend": "fast", "layers": 0}  # filled when the fast decoder takes the weights
        elif config.sparse:
            from maskpro.serve.sparse_linear import TOKEN_BUCKETS, token_bucket, sparsify

            from .slot_cache import PREFILL_GRAPH_TOKENS

            # decode steps and short prefills replayed from graphs are planned by device time (no host launch cost)
            graphed = ({token_bucket(1 << i) for i in range(config.max_batch_size.bit_length() + 1)}
                       | {t for t in TOKEN_BUCKETS if t <= PREFILL_GRAPH_TOKENS}) if graphs_wanted else set()
            self.sparsity = dict(sparsify(self.model, graph_buckets=tuple(sorted(graphed))))
        else:
            self.sparsity = {"backend": "dense", "reason": "sparse runtime disabled (--no-sparse)", "layers": 0}
        self.load_s = round(time.perf_counter() - t0, 2)
        self.maskpro_meta = self._read_meta()
        self.model_id = config.served_model_name or self.path.name
        self.max_context = int(getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings",
                                       0) or 0) or 1 << 20
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.max_context - 1, self.max_context - 1)
        self.eos_ids = self._eos_ids()
        self.pad_id = self._pad_id()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        from maskpro.models import cache_kwarg

        self._cache_kw = cache_kwarg(self.model)
        self._decoder, self.kv_cache = self._slot_decoder()
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._batch: _Batch | None = None
        self._prefilling: list[_Request] = []
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

    # ------------------------------------------------------------------------------------- KV cache
    def _runtime(self) -> str:
        """'fast' (maskpro's compiled Llama-family decoder) or 'transformers', from ``config.runtime``."""
        from .fast_model import FAMILY

        kind = getattr(self.model.config, "model_type", "?")
        if self.config.runtime == "fast":  # on CPU it runs eagerly (what the CPU tests exercise)
            return "fast"
        auto = (self.config.runtime == "auto" and self.device.type == "cuda" and kind in FAMILY
                and self.config.kv_cache != "dynamic")
        return "fast" if auto else "transformers"

    def _fast_decoder(self) -> tuple[SlotDecoder, dict]:
        """The fast runtime's decoder over a static slot cache; the transformers model's linears are released
        as it takes their weights (2:4 ones compressed only, with ``config.sparse``)."""
        from .fast_decoder import for_engine

        capacity = min(self.max_context, self.max_prompt_tokens + self.config.max_new_tokens)
        decoder, self.sparsity, kv = for_engine(self.model, self.config.max_batch_size, capacity, self.dtype,
                                                self.device, self.config.sparse, self.config.cuda_graphs)
        return decoder, kv

    def _slot_decoder(self) -> tuple[SlotDecoder | None, dict]:
        """The static slot cache and its decoder where ``kv_cache`` allows it; else (None, why not)."""
        from transformers import DynamicCache

        if self.runtime == "fast":
            return self._fast_decoder()
        mode = self.config.kv_cache
        if mode == "dynamic" or (mode == "auto" and self.device.type != "cuda"):
            return None, {"kind": "dynamic", "why": "kv_cache=dynamic" if mode == "dynamic" else "not on a GPU"}
        probe = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([[self.pad_id]], device=self.device), use_cache=True,
                       **{self._cache_kw: probe})
        attn = getattr(self.model.config, "_attn_implementation", None)
        why = ("the model's KV cache is not plain full attention" if not _cache_joinable(probe) else
               f"attention implementation {attn!r} takes no 4D mask (use sdpa or eager)"
               if attn not in ("sdpa", "eager") else None)
        if why is None:
            k = probe.layers[0].keys
            slots, capacity = self.config.max_batch_size, min(self.max_context, self.max_prompt_tokens +
                                                              self.config.max_new_tokens)
            need = cache_bytes(len(probe.layers), slots, capacity, k.shape[1], k.shape[3], k.dtype)
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            if free is not None and need > STATIC_CACHE_SHARE * free:
                why = (f"a static KV cache for {slots} rows x {capacity} tokens needs {need / 2**30:.1f} GiB, more "
                       f"than half the free {free / 2**30:.1f} GiB; lower --max-batch-size, --max-prompt-tokens "
                       f"or --max-tokens")
        if why is not None:
            if mode == "static":
                raise MaskproError(f"kv_cache=static is not possible: {why}")
            log.warning("using the dynamic KV cache: %s", why)
            return None, {"kind": "dynamic", "why": why}
        cache = SlotCache(len(probe.layers), slots, capacity, k.shape[1], k.shape[3], k.dtype, self.device)
        graphs = self.config.cuda_graphs and self.device.type == "cuda"
        decoder = SlotDecoder(self.model, cache, graphs, self._logits_to_keep)
        t0 = time.perf_counter()
        with torch.inference_mode():
            decoder.warmup()
        log.info("static KV cache: %d slots x %d tokens, %.2f GiB; decode %s", slots, capacity,
                 need / 2**30, f"from CUDA graphs ({decoder.captured} captured in "
                                       f"{time.perf_counter() - t0:.1f} s)" if graphs else "eager")
        return decoder, {"kind": "static", "slots": slots, "capacity_tokens": capacity,
                         "bytes": need, "gib": round(need / 2**30, 3)}

    def _graphs_info(self) -> dict:
        d, requested = self._decoder, bool(self.config.cuda_graphs)
        if d is not None and d.graphs:
            return {"requested": requested, "active": True, "captured": d.captured,
                    "prefill": {"active": d.prefill_graphs, "captured": d.prefills_captured}}
        why = ("not requested (--no-cuda-graphs)" if not requested else "not on a GPU" if self.device.type != "cuda"
               else f"capture failed: {d.capture_failed}" if d is not None and d.capture_failed
               else f"needs the static KV cache ({self.kv_cache.get('why')})")
        return {"requested": requested, "active": False, "why": why}

    # -------------------------------------------------------------------------------------- metadata
    def _read_meta(self) -> dict | None:
        meta = self.path / "maskpro.json"
        if not meta.is_file():
            return None
        data = json.loads(meta.read_text())
        return {k: data[k] for k in ("format", "n", "m", "method", "source_model") if k in data}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if value is None:
                continue
            ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        return ids

    def _pad_id(self) -> int:
        for value in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, *sorted(self.eos_ids)):
            if value is not None:
                return int(value)
        return 0

    def info(self) -> dict:
        """What /health and /v1/models report about the loaded model."""
        return {"model": self.model_id, "path": str(self.path), "backend": "torch", "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "max_context": self.max_context,
                "max_prompt_tokens": self.max_prompt_tokens, "max_new_tokens": self.config.max_new_tokens,
                "max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue,
                "sparsity": self.sparsity, "maskpro": self.maskpro_meta, "kv_cache": self.kv_cache,
                "cuda_graphs": self._graphs_info(),
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
        if isinstance(prompt, str):
            with self._encode_lock:
                return list(self.tokenizer(prompt)["input_ids"])
        vocab = len(self.tokenizer)
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= max(vocab, self.model.config.get_text_config(decoder=True).vocab_size) for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids for /v1/chat/completions through the tokenizer's chat template."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(f"model {self.model_id} has no chat template; use /v1/completions",
                                      param="messages")
        with self._encode_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # a template may raise on role order etc.
                raise InvalidRequestError(f"the chat template rejected the messages: {str(e).splitlines()[0]}",
                                          param="messages") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty (0 tokens)", param=param_prompt)
        if n_prompt > self.max_prompt_tokens:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens, more than this server's limit of "
                                     f"{self.max_prompt_tokens}; shorten it", param=param_prompt)
        room = self.max_context - n_prompt
        max_tokens = params.max_tokens
        if max_tokens is not None:
            if max_tokens < 1:
                raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
            if max_tokens > self.config.max_new_tokens:
                raise MaxTokensError(f"max_tokens {max_tokens} is more than this server's limit of "
                                     f"{self.config.max_new_tokens}", param="max_tokens")
            if max_tokens > room:
                raise PromptTooLongError(f"this model's context is {self.max_context} tokens; the prompt ("
                                         f"{n_prompt}) plus max_tokens ({max_tokens}) exceed it", param="max_tokens")
        else:
            max_tokens = min(default_max_tokens or self.config.max_new_tokens, self.config.max_new_tokens, room)
            if max_tokens < 1:
                raise PromptTooLongError(f"the prompt ({n_prompt} tokens) fills this model's context of "
                                         f"{self.max_context} tokens", param=param_prompt)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        req = _Request(list(prompt_ids), params, max_tokens, _Sink(loop),
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
                        if _sticky(e) or failures >= MAX_FAILED_STEPS:
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

    def _end(self, req: _Request, error: ServeError) -> None:
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

    def _admit(self) -> list[_Request]:
        now = time.monotonic()
        taken: list[_Request] = []
        running = self._batch.size if self._batch is not None else 0
        if self._joinable is False and running:
            return taken
        with self._lock:
            kept: deque[_Request] = deque()
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
            except _ForwardOutOfMemory:
                pass  # shed outside the handler, which still holds the failed step's tensors
            self._shed_largest()
        self._running = self._batch.size if self._batch is not None else 0
        self._steps += 1

    def _join(self, new: list[_Request]) -> None:
        """Prefill newcomers and add them to the batch. When the model's forward runs out of memory, a group is
        retried one request at a time, so only a request that does not fit alone fails; the running rows are
        never touched. Until the group is in the batch it stays in ``_prefilling``, which a failure fails."""
        self._prefilling = new
        try:
            group = self._prefill(new) if self._decoder is None else self._prefill_slots(new)
        except _ForwardOutOfMemory:
            group = _ForwardOutOfMemory  # recover outside the handler, which still holds the failed tensors
        if group is _ForwardOutOfMemory:
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
            self._batch = group if self._batch is None else _merge(self._batch, group)
        self._prefilling = []

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _shed_largest(self) -> None:
        """A decode step ran out of memory: fail the row holding the longest context, keep the others (their
        cache is cut back to before the step, which may have written some layers), and let the step retry."""
        batch = self._batch
        if batch.mask is not None:
            for layer in _layers(batch.cache):
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
        self._batch = _select(batch, [i for i in range(batch.size) if i != victim])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with _forward_memory():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_kw: cache}, **kwargs)
            return out.logits[:, -1, :].float()

    def _prefill(self, reqs: list[_Request]) -> _Batch | None:
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
            self._joinable = _cache_joinable(cache)
            if not self._joinable:
                log.warning("this model's KV cache is not plain full attention: new requests join only an "
                            "empty batch (static batching)")
        batch = _Batch(list(reqs), cache, mask, torch.zeros(len(reqs), dtype=torch.long, device=self.device))
        return self._sample_and_emit(batch, logits)

    def _prefill_slots(self, reqs: list[_Request]) -> _Batch | None:
        """Prefill into the slots after the running rows (from a CUDA graph where one fits), sample the first
        tokens; rows that finish at once are compacted away within the group's slots."""
        for r in reqs:
            self._init_request(r)
        first = self._batch.size if self._batch is not None else 0
        with _forward_memory():
            logits = self._decoder.prefill([r.prompt_ids for r in reqs], first, self.pad_id)
        group = _Batch(list(reqs), self._decoder.cache.from_slot(first), None,
                       torch.zeros(len(reqs), dtype=torch.long, device=self.device))
        group = self._sample_and_emit(group, logits)
        return None if group is None else _Batch(group.reqs, self._decoder.cache, None, group.next_tokens)

    def _decode(self) -> None:
        batch = self._batch
        if self._decoder is not None:
            positions = [len(r.prompt_ids) + len(r.generated) - 1 for r in batch.reqs]
            with _forward_memory():
                logits = self._decoder.step(batch.next_tokens, positions)
            self._batch = self._sample_and_emit(batch, logits)
            return
        positions = torch.tensor([[len(r.prompt_ids) + len(r.generated) - 1] for r in batch.reqs],
                                 dtype=torch.long, device=self.device)
        mask = torch.cat([batch.mask, torch.ones((batch.size, 1), dtype=batch.mask.dtype, device=self.device)], 1)
        logits = self._forward(batch.next_tokens[:, None], mask, positions, batch.cache)
        batch.mask = mask
        self._batch = self._sample_and_emit(batch, logits)

    def _init_request(self, r: _Request) -> None:
        r.detok = IncrementalDetokenizer(self._decode_tokenizer)
        r.stops = StopMatcher(r.params.stop)
        if r.params.temperature > 0:
            seed = r.params.seed if r.params.seed is not None else secrets.randbits(63)
            r.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if r.params.presence_penalty or r.params.frequency_penalty:
            r.counts = torch.zeros(logits_width(self.model), dtype=torch.float32, device=self.device)

    def _sample(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        for i, r in enumerate(batch.reqs):
            if r.counts is not None:
                logits[i] -= r.params.frequency_penalty * r.counts + r.params.presence_penalty * (r.counts > 0)
        tokens = logits.argmax(-1)
        rows = [i for i, r in enumerate(batch.reqs) if r.generator is not None]
        if rows:
            # one batched softmax and CDF; each row draws a single uniform number from its own seeded
            # generator and takes the first token whose CDF exceeds it (exact, and cheap for wide vocabularies)
            reqs = [batch.reqs[i] for i in rows]
            temps = torch.tensor([r.params.temperature for r in reqs], device=logits.device)
            probs = torch.softmax(logits[rows] / temps[:, None], -1)
            for j, r in enumerate(reqs):
                if r.params.top_p < 1.0:  # nucleus: the smallest set of most likely tokens reaching top_p
                    sorted_p, order = probs[j].sort(descending=True)
                    sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= r.params.top_p] = 0.0
                    probs[j] = torch.zeros_like(probs[j]).scatter_(0, order, sorted_p)
            cdf = probs.cumsum(-1)
            u = torch.cat([torch.rand(1, generator=r.generator, device=logits.device) for r in reqs]) * cdf[:, -1]
            drawn = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
            tokens[rows] = drawn
        batch.next_tokens = tokens
        return tokens.tolist()

    def _sample_and_emit(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        now = time.monotonic()
        keep: list[int] = []
        for i, (r, token) in enumerate(zip(batch.reqs, self._sample(batch, logits))):
            if r.cancelled.is_set():
                self._end(r, ClientCancelledError("cancelled by the client"))
            if r.done:
                continue
            if now >= r.deadline:
                self._end(r, RequestTimeoutError(f"the request took more than {self.config.request_timeout_s:g} s"))
                continue
            if self._emit(r, token):
                keep.append(i)
        return _select(batch, keep)

    def _emit(self, r: _Request, token: int) -> bool:
        """Account one sampled token and send its text; returns whether the request keeps running."""
        r.generated.append(token)
        if r.counts is not None:
            r.counts[token] += 1
        n = len(r.generated)
        if token in self.eos_ids and not r.params.ignore_eos:
            finish, text = "stop", self._drain(r)
        else:
            text, hit = r.stops.feed(r.detok.push(token))
            finish = "stop" if hit else None
            if finish is None and (n >= r.max_tokens or len(r.prompt_ids) + n >= self.max_context):
                more, hit = r.stops.feed(r.detok.flush())
                text += more if hit else more + r.stops.flush()
                finish = "stop" if hit else "length"
        if text:
            r.sink.put(Delta(text, n))
        if finish is None:
            return True
        r.done = True
        r.finish_reason = finish
        r.sink.put(Finished(finish, len(r.prompt_ids), n))
        self._count(finish)
        return False

    @staticmethod
    def _drain(r: _Request) -> str:
        """Text held back at the end (an unfinished character, a tail that was not a stop sequence)."""
        more, hit = r.stops.feed(r.detok.flush())
        return more if hit else more + r.stops.flush()


def logits_width(model) -> int:
    """Size of the vocabulary axis of the model's logits (may exceed len(tokenizer))."""
    out = model.get_output_embeddings()
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)
