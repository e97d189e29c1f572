"""Generated tokens to streamed text: incremental detokenization and holding back possible stop sequences."""

from __future__ import annotations

from typing import Sequence

__all__ = ["IncrementalDetokenizer", "StopMatcher"]


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
