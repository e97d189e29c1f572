"""OpenAI-compatible HTTP API over a :class:`~maskpro.serve.request.Backend` (FastAPI + prometheus-client).

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` sends server-sent events ending with ``data: [DONE]``) and
``GET /metrics``. Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``:
400 for bad input (malformed JSON and schema errors too, where FastAPI would say 422), 404 for an unknown
model or route, 413 for an oversized body, 429 when the wait queue is full, 503 while shutting down,
504 on the request timeout and 500 for a bug.

A streamed request waits for its first event before the response starts, so errors found before the
first token (queue timeout, shutdown) still get their real status; an error after that arrives as a
``data: {"error": ...}`` event followed by ``data: [DONE]`` (what the openai client raises on).

The request bodies are in :mod:`maskpro.serve.schemas`, the API key, body limit and request metrics in
:mod:`maskpro.serve.guard` and :mod:`maskpro.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard
from .metrics import Metrics
from .protocol import (
    Delta,
    Failed,
    Finished,
    InvalidRequestError,
    ModelNotFoundError,
    ServeError,
    error_body,
)
from .request import Backend, RequestHandle
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest, template_messages

log = logging.getLogger(__name__)

__all__ = ["ServerConfig", "create_app"]


@dataclass
class ServerConfig:
    """HTTP-level limits; the generation limits live in the engine's config."""

    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_grace_s: float = 5.0
    api_key: str | None = None   # when set, /v1/* needs "Authorization: Bearer <key>" (/health, /metrics stay open)


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status)


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "service_unavailable_error", 504: "timeout_error"}
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line and the offending field for a schema error (a union reports one error per member)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}", None
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return "the request body must be a JSON object", None
    # the field path ends where pydantic starts naming union members ("str", "list[int]", ...)
    field_path: list[str] = []
    for part in loc:
        if isinstance(part, str) and (part[:1].islower() and ("[" in part or part in _TYPE_TAGS)):
            break
        field_path.append(str(part))
    param = ".".join(field_path)
    same = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:len(field_path)] == field_path]
    if len(same) > 1 and first.get("type") != "missing":
        deepest = max(same, key=lambda e: len(e.get("loc", ())))
        inner = [str(p) for p in deepest.get("loc", ()) if p != "body"][len(field_path) + 1:]
        if inner:  # the value had the right container type; one of its items is wrong
            where = ".".join([param, *inner])
            return f"{where}: {deepest.get('msg', 'invalid value')}", param
        got = type(first.get("input")).__name__
        got = {"NoneType": "null", "str": "string", "int": "integer", "float": "number", "list": "array",
               "dict": "object", "bool": "boolean"}.get(got, got)
        return f"{param}: {got} is not an accepted type for this field", param
    return f"{param}: {first.get('msg', 'invalid value')}", param


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after", "function-plain"}


# ------------------------------------------------------------------------------------------------- app

def create_app(backend: Backend, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; starts the backend's worker on startup and stops it on shutdown."""
    config = config or ServerConfig()
    metrics = Metrics(backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        try:
            yield
        finally:  # uvicorn has waited for open connections by now; what is left is cut off (503)
            await asyncio.to_thread(backend.stop, config.shutdown_grace_s + 10.0)

    app = FastAPI(title="maskpro-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.metrics = metrics
    app.add_middleware(Guard, metrics=metrics, max_body_bytes=config.max_body_bytes, api_key=config.api_key)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code if exc.status_code != 422 else 400
        detail = str(exc.detail)
        if status in (404, 405):
            detail = f"{detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(detail, _STATUS_TYPES.get(status, "server_error"), None,
                                       _STATUS_CODES.get(status)), status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None,
                                       "internal_error"), status_code=500)

    # ------------------------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        if not backend.is_ready():
            stopped = backend.stats().get("stopped")
            why = f"the engine stopped ({stopped}); restart the server" if stopped else \
                "the server is not ready or is shutting down"
            body = error_body(why, "service_unavailable_error", None, "unavailable")
            return JSONResponse({"status": "unavailable", **body}, status_code=503)
        return {"status": "ok", **backend.info(), **backend.stats()}

    def model_card() -> dict:
        info = backend.info()
        return {"id": backend.model_id, "object": "model", "created": _STARTED, "owned_by": "maskpro",
                "root": info.get("path"), "max_model_len": backend.max_context,
                "sparsity": info.get("sparsity"), "maskpro": info.get("maskpro")}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != backend.model_id:
            raise ModelNotFoundError(f"the model {model_id!r} does not exist; this server serves "
                                     f"{backend.model_id!r}", param="model")
        return model_card()

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(backend, body.model)
        if body.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if body.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if body.logprobs:
            raise InvalidRequestError("logprobs are not supported", param="logprobs")
        if body.best_of not in (None, 1):
            raise InvalidRequestError("best_of > 1 is not supported", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError("a list of several prompts is not supported; send one prompt per "
                                          "request", param="prompt")
            prompt = prompt[0]
        params = body.sampling(body.max_tokens)
        ids = await asyncio.to_thread(backend.encode_prompt, prompt)  # tokenizing a long prompt stays off the loop
        handle = backend.submit(ids, params, default_max_tokens=_completion_default(backend),
                                param_prompt="prompt")
        return await _respond(request, handle, body, metrics, chat=False, model_id=backend.model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(backend, body.model)
        if not body.messages:
            raise InvalidRequestError("messages must hold at least one message", param="messages")
        if body.logprobs or body.top_logprobs:
            raise InvalidRequestError("logprobs are not supported", param="logprobs")
        if body.tools:
            raise InvalidRequestError("tools are not supported", param="tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise InvalidRequestError("only response_format type 'text' is supported", param="response_format")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise InvalidRequestError("max_tokens and max_completion_tokens disagree; send one",
                                      param="max_completion_tokens")
        params = body.sampling(body.max_completion_tokens or body.max_tokens)
        ids = await asyncio.to_thread(backend.encode_chat, template_messages(body.messages))
        handle = backend.submit(ids, params, param_prompt="messages")
        return await _respond(request, handle, body, metrics, chat=True, model_id=backend.model_id)

    return app


_STARTED = int(time.time())


def _completion_default(backend: Backend) -> int:
    """max_tokens of a /v1/completions request that sends none (OpenAI: 16; EngineConfig.default_max_tokens)."""
    return getattr(getattr(backend, "config", None), "default_max_tokens", 16)


def _check_model(backend: Backend, model: str) -> None:
    if model != backend.model_id:
        raise ModelNotFoundError(f"the model {model!r} does not exist; this server serves {backend.model_id!r}",
                                 param="model")


# --------------------------------------------------------------------------------------------- responses

def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _watch_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancel the request when the client goes away (non-streaming responses)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _respond(request: Request, handle: RequestHandle, body: SamplingRequest, metrics: Metrics, *, chat: bool,
                   model_id: str):
    t0 = time.perf_counter()
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    watcher = asyncio.create_task(_watch_disconnect(request, handle))
    try:
        first = await handle.next_event()
    except BaseException:
        watcher.cancel()
        handle.cancel()
        raise
    if isinstance(first, Failed):
        watcher.cancel()
        raise first.error
    metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
    if body.stream:
        watcher.cancel()  # from here the streaming response notices the disconnect itself
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(handle, first, metrics, rid, created, model_id, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        parts: list[str] = []
        event = first
        while True:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            else:
                break
            event = await handle.next_event()
    finally:
        watcher.cancel()
        handle.cancel()
    metrics.generated.inc(event.completion_tokens)
    metrics.prompt.inc(event.prompt_tokens)
    text = "".join(parts)
    usage = _usage(event.prompt_tokens, event.completion_tokens)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": event.finish_reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [choice], "usage": usage, "system_fingerprint": None}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model_id, "choices": [choice],
            "usage": usage, "system_fingerprint": None}


async def _stream(handle: RequestHandle, first, metrics: Metrics, rid: str, created: int, model_id: str,
                  chat: bool, include_usage: bool) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                "system_fingerprint": None, **extra}

    event = first
    try:
        if chat:
            yield _sse(chunk("", None, role=True))
        while True:
            if isinstance(event, Delta):
                yield _sse(chunk(event.text, None))
            elif isinstance(event, Finished):
                metrics.generated.inc(event.completion_tokens)
                metrics.prompt.inc(event.prompt_tokens)
                yield _sse(chunk(None if chat else "", event.finish_reason))
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": model_id, "choices": [],
                                "system_fingerprint": None,
                                "usage": _usage(event.prompt_tokens, event.completion_tokens)})
                break
            else:
                yield _sse(event.error.to_dict())
                break
            event = await handle.next_event()
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()
