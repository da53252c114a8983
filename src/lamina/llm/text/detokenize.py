"""From a stream of token ids to a stream of text pieces: UTF-8 safe, stop strings withheld.

Byte-level tokenizers split multi-byte characters (emoji, CJK) across tokens, so decoding one token at a
time would emit U+FFFD halves. `IncrementalDetokenizer` decodes a sliding window (the method of
transformers' TextStreamer and vLLM) and holds text back while it ends in an incomplete character.

`StopStrings` holds back any tail that could still become a stop string, and cuts the text where one
appears, so the caller never sees any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from lamina.foundation.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is complete (possibly "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # text received but not yet released
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what can be released. After a stop string is found, `stopped` is set."""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            released, self.pending, self.stopped = self.pending[:cut], "", True
            return released
        hold = self._longest_stop_prefix_suffix()
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return released

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of `pending` that is the start of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best
