"""What a serving backend and its callers exchange: sampling settings, the events of a request, and the errors
a client receives (each one carries its HTTP status and OpenAI's error type and code)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingParams", "Delta", "Finished", "Failed", "Event", "Completion", "error_body", "ServeError",
           "InvalidRequestError", "PromptTooLongError", "MaxTokensError", "ModelNotFoundError", "QueueFullError",
           "RequestTimeoutError", "UnavailableError", "OutOfMemoryError", "ClientCancelledError"]


# ------------------------------------------------------------------------------------------------ errors

def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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
        return error_body(self.message, self.type, self.param, self.code)


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


# ---------------------------------------------------------------------------------------------- sampling

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
