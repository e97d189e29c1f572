"""ASGI middleware in front of the API: the API key on /v1/* (401), the request body limit (413), and the
per-request metrics (count by endpoint and status, latency), for every response including refused ones."""

from __future__ import annotations

import hmac
import json
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .protocol import error_body

__all__ = ["ENDPOINTS", "Guard", "BodyTooLarge", "authorized", "send_json"]

ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics")


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


def authorized(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <api_key>``, compared in constant time (a timing
    difference must not reveal how much of a guessed key was right)."""
    value = dict(headers).get(b"authorization", b"")
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key.encode())


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: the API key on /v1/* (401), body-size limit (413) and per-request metrics (count by
    status, latency)."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, api_key: str | None = None):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        t0 = time.perf_counter()
        status = [500]
        self.metrics.in_flight.inc()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path.startswith("/v1") and not authorized(scope.get("headers") or [], self.api_key):
                await send_json(send_wrapper, 401, error_body(
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key the "
                    "server was started with (--api-key or MASKPRO_API_KEY)", "invalid_request_error", None,
                    "invalid_api_key"), headers=[(b"www-authenticate", b"Bearer")])
                return
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await send_json(send_wrapper, 413, error_body(str(BodyTooLarge(self.max_body).detail),
                                                               "invalid_request_error", None, "payload_too_large"))
                return
            received = [0]

            async def limited_receive():
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.max_body:
                        raise BodyTooLarge(self.max_body)
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
