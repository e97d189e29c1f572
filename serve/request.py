"""One request's life: the limits it is admitted under, the record the engine's worker keeps for it (its
generated tokens and the text they stream as), the caller's handle on its events, and the :class:`Backend`
interface that takes requests.

Events cross from the worker thread to the caller through an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe`` (or through a thread queue for synchronous callers).
"""

from __future__ import annotations

import asyncio
import queue as thread_queue
import secrets
import threading
import time
from typing import AsyncIterator, Iterator, Protocol, Sequence

import torch

from .protocol import (
    Completion,
    Delta,
    Event,
    Failed,
    Finished,
    InvalidRequestError,
    MaxTokensError,
    PromptTooLongError,
    SamplingParams,
    ServeError,
)
from .streaming import IncrementalDetokenizer, StopMatcher

__all__ = ["Backend", "RequestHandle", "GenerationRequest", "EventSink", "admitted_max_tokens"]


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


def admitted_max_tokens(n_prompt: int, params: SamplingParams, *, max_prompt_tokens: int, max_context: int,
                        max_new_tokens: int, default_max_tokens: int | None, param_prompt: str) -> int:
    """The number of tokens a request may generate; raises the 400 a client gets for a prompt or a
    ``max_tokens`` over the server's limits or the model's context."""
    if n_prompt == 0:
        raise InvalidRequestError("the prompt is empty (0 tokens)", param=param_prompt)
    if n_prompt > max_prompt_tokens:
        raise PromptTooLongError(f"the prompt has {n_prompt} tokens, more than this server's limit of "
                                 f"{max_prompt_tokens}; shorten it", param=param_prompt)
    room = max_context - n_prompt
    max_tokens = params.max_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > max_new_tokens:
            raise MaxTokensError(f"max_tokens {max_tokens} is more than this server's limit of "
                                 f"{max_new_tokens}", param="max_tokens")
        if max_tokens > room:
            raise PromptTooLongError(f"this model's context is {max_context} tokens; the prompt ("
                                     f"{n_prompt}) plus max_tokens ({max_tokens}) exceed it", param="max_tokens")
        return max_tokens
    max_tokens = min(default_max_tokens or max_new_tokens, max_new_tokens, room)
    if max_tokens < 1:
        raise PromptTooLongError(f"the prompt ({n_prompt} tokens) fills this model's context of "
                                 f"{max_context} tokens", param=param_prompt)
    return max_tokens


class EventSink:
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


class GenerationRequest:
    """The worker's record of one request: its limits, what it generated so far and its text stream."""

    __slots__ = ("id", "prompt_ids", "params", "max_tokens", "sink", "deadline", "cancelled", "created",
                 "done", "generated", "detok", "stops", "generator", "counts", "finish_reason")

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, sink: EventSink,
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

    def accept(self, token: int, eos_ids: set[int], max_context: int) -> bool:
        """Account one sampled token and send its text; returns whether the request keeps running (when not,
        ``finish_reason`` says why and the ``Finished`` event is sent)."""
        self.generated.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        n = len(self.generated)
        if token in eos_ids and not self.params.ignore_eos:
            finish, text = "stop", self._drain()
        else:
            text, hit = self.stops.feed(self.detok.push(token))
            finish = "stop" if hit else None
            if finish is None and (n >= self.max_tokens or len(self.prompt_ids) + n >= max_context):
                more, hit = self.stops.feed(self.detok.flush())
                text += more if hit else more + self.stops.flush()
                finish = "stop" if hit else "length"
        if text:
            self.sink.put(Delta(text, n))
        if finish is None:
            return True
        self.done = True
        self.finish_reason = finish
        self.sink.put(Finished(finish, len(self.prompt_ids), n))
        return False

    def _drain(self) -> str:
        """Text held back at the end (an unfinished character, a tail that was not a stop sequence)."""
        more, hit = self.stops.feed(self.detok.flush())
        return more if hit else more + self.stops.flush()


class RequestHandle:
    """The caller's side of a request: iterate its events (async or sync) and cancel it."""

    def __init__(self, request: GenerationRequest):
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
