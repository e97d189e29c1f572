"""The OpenAI request bodies the server accepts (pydantic), and their translation into engine inputs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol import InvalidRequestError, SamplingParams

__all__ = ["StrictModel", "StreamOptions", "SamplingRequest", "CompletionRequest", "ContentPart", "ChatMessage",
           "ResponseFormat", "ChatCompletionRequest", "template_messages"]


class StrictModel(BaseModel):
    # strict: "16" is not an int and 1 is not a bool, as in OpenAI's API; unknown fields are ignored
    # (clients send vendor extensions) rather than refused.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise InvalidRequestError("stop takes up to 16 non-empty strings", param="stop")
        if self.n != 1:
            raise InvalidRequestError(f"n={self.n} is not supported (only n=1); send {self.n} requests",
                                      param="n")
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=tuple(stops), presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(StrictModel):
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(StrictModel):
    type: str = "text"


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as a chat template takes them: text content only, OpenAI's "developer" as "system"."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(f"content part type {part.type!r} is not supported (text only)",
                                              param=f"messages.{i}.content")
                texts.append(part.text)
            content = "".join(texts)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out
