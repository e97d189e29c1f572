"""Prompts to token ids for the embedded engine, called from the server's threads while the worker decodes.

A fast tokenizer is one Rust object behind PyO3 borrow checks: encoding in two threads, or encoding while
another thread decodes, can raise "Already borrowed" (huggingface/tokenizers#537). Encoding is serialized
by a lock here; the engine's worker decodes with its own copy of the tokenizer.
"""

from __future__ import annotations

import threading
from typing import Sequence

from .protocol import InvalidRequestError

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """Token ids for /v1/completions and /v1/chat/completions; invalid prompts raise the client's 400."""

    def __init__(self, tokenizer, model_vocab_size: int, model_id: str):
        self.tokenizer = tokenizer
        self.model_vocab_size = model_vocab_size   # the model's embedding rows, may exceed len(tokenizer)
        self.model_id = model_id
        self._lock = threading.Lock()

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Text is tokenized with the tokenizer's special tokens (BOS); token ids are range checked."""
        if isinstance(prompt, str):
            with self._lock:
                return list(self.tokenizer(prompt)["input_ids"])
        vocab = len(self.tokenizer)
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= max(vocab, self.model_vocab_size) for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Messages through the tokenizer's chat template, with the assistant's turn opened."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(f"model {self.model_id} has no chat template; use /v1/completions",
                                      param="messages")
        with self._lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # a template may raise on role order etc.
                raise InvalidRequestError(f"the chat template rejected the messages: {str(e).splitlines()[0]}",
                                          param="messages") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
