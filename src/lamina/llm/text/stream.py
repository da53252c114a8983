"""Per-request text state: token events in, text deltas out (UTF-8 safe, stop strings cut and withheld).

Shared by every driver of the engine: the synchronous Python API (`LLM.stream_ids`) and the server's
asynchronous one (`AsyncLLM.stream`). When a stop string completes, the delta carries `finish_reason="stop"`
and the driver must abort the request in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lamina.foundation.tokenizer import Tokenizer
from lamina.llm.engine.core import FinishReason, TokenEvent
from lamina.llm.text.detokenize import IncrementalDetokenizer, StopStrings


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: bytes
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass
class Delta:
    """A piece of streamed output: new text (maybe empty), and the finish reason on the last one."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    """Prompt tokens whose keys/values were reused from the cache."""


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stop)

    def push(self, event: TokenEvent) -> Delta:
        delta = Delta("", [event.token_id], cached_tokens=event.cached_prompt_tokens)
        if event.logprob is not None:
            delta.logprobs.append(self._logprob(event))
        if not event.is_stop_token:
            delta.text = self._stops.push(self._detok.push(event.token_id))
        if self._stops.stopped:
            delta.finish_reason = "stop"
        elif event.finish_reason is not None:
            delta.text += self._stops.push(self._detok.flush())
            if not self._stops.stopped:
                delta.text += self._stops.flush()
            delta.finish_reason = "stop" if self._stops.stopped else event.finish_reason
        return delta

    def _logprob(self, event: TokenEvent) -> TokenLogprob:
        tok = self.tokenizer
        top = tuple(TopLogprob(tok.decode([i]), lp, tok.token_bytes(i)) for i, lp in event.top_logprobs)
        return TokenLogprob(tok.decode([event.token_id]), event.logprob or 0.0, tok.token_bytes(event.token_id), top)
