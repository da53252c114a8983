"""The Python API for text generation: `LLM.load(...)`, then `generate`, `stream`, `chat`, `stream_chat`.

    from lamina import LLM
    llm = LLM.load("smollm2-135m-instruct")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0).text)
    for piece in llm.stream_chat([{"role": "user", "content": "Tell me a story"}], max_tokens=200):
        print(piece, end="", flush=True)

This layer owns text: tokenizing, chat templates, incremental detokenizing and stop strings. The engine
underneath sees token ids only.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamina.arch import build_model
from lamina.arch.kv_cache import SlotCache
from lamina.errors import InvalidRequestError
from lamina.foundation.tokenizer import Tokenizer
from lamina.infra.device import optimize_for_inference, resolve_device, resolve_dtype
from lamina.infra.registry import ModelEntry, Registry
from lamina.llm.engine.core import Engine, EngineArgs, FinishReason
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.formats import gguf
from lamina.llm.formats.loader import read_checkpoint
from lamina.llm.kernels.quant import QuantLinear, quantize_model
from lamina.llm.text.chat_template import ChatTemplate, Message
from lamina.llm.text.stream import Delta, TextStream, TokenLogprob
from lamina.settings import get_settings

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class LLM:
    """A loaded generative model with its tokenizer and chat template."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        name: str,
        eos_ids: Sequence[int],
        chat_template: str | None = None,
        entry: ModelEntry | None = None,
        engine_args: EngineArgs | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.entry = entry
        self.config = model.config
        self.chat_template = ChatTemplate(chat_template, tokenizer) if chat_template else None
        self.engine = Engine(
            model, eos_ids=eos_ids, max_seq_len=self.config.max_seq_len, vocab_size=self.config.vocab_size, args=engine_args,
            cache_dir=cache_dir,
        )
        self._lock = threading.Lock()  # one generation at a time (the engine holds one sequence's cache)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        home: str | Path | None = None,
        engine_args: EngineArgs | None = None,
        quantize: str | None = None,
    ) -> LLM:
        """Load a model by id (see `lamina models`), .gguf path or Hugging Face folder.

        device: auto|cpu|cuda|cuda:N|mps; dtype: auto|float32|bfloat16|float16 (auto: fastest measured
        here). Unset arguments come from LAMINA_MODEL, LAMINA_DEVICE, LAMINA_DTYPE, LAMINA_HOME.
        """
        settings = get_settings()
        home = Path(home).expanduser() if home else settings.home
        entry = Registry(home).resolve(model or settings.model)
        dev = resolve_device(device or settings.device)
        dt = resolve_dtype(dtype or settings.dtype, dev, home / "cache")
        ckpt = read_checkpoint(entry, dt)
        net = build_model(ckpt.config, ckpt.state_dict, device=dev, dtype=dt).eval()
        del ckpt.state_dict
        optimize_for_inference(net, dev, home / "cache")
        if quantize:
            if quantize not in ("int8", "int4"):
                raise InvalidRequestError(f"unknown quantisation {quantize!r}; use int8 or int4", param="quantize")
            stored = gguf.native_blocks(gguf.open_gguf(entry.path), ckpt.config) if entry.format == "gguf" else None
            quantize_model(net, quantize, home / "cache", stored)  # type: ignore[arg-type]
        logger.info("loaded %s (%s) on %s in %s", entry.id, ckpt.config.family, dev, dt)
        return cls(
            net, ckpt.tokenizer, name=entry.id, eos_ids=ckpt.eos_ids, chat_template=ckpt.chat_template, entry=entry,
            engine_args=engine_args, cache_dir=home / "cache",
        )

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Add the LoRA adapter (PEFT layout) in `path` under `name`; requests choose it with `adapter=name`.

        The base model stays the default: adapters apply only to the requests that ask for them, and requests
        for different adapters share one batch. An adapter trained for another base model is refused.
        """
        from lamina.arch.lora import set_active_adapter
        from lamina.llm.tuning.adapters import load_adapter

        if any(isinstance(m, QuantLinear) for m in self.model.modules()):
            raise InvalidRequestError("LoRA adapters cannot be served on a quantised model; serve without --quantize "
                                      "(or merge the adapter with `lamina lora merge` and quantise the merged model)",
                                      param="lora")
        if name == self.name or name in self.engine.runner.adapters:
            raise InvalidRequestError(f"the name {name!r} is already taken; give each adapter its own name", param="lora")
        load_adapter(self.model, path, adapter_name=name, base_model_id=self.entry.id if self.entry else None)
        set_active_adapter(self.model, None)
        self.engine.runner.refresh_adapters()

    @property
    def adapters(self) -> list[str]:
        return sorted(self.engine.runner.adapters)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- prompts -----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._template().render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self._template().encode(messages, add_generation_prompt=add_generation_prompt)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("the prompt is empty: give some text to continue", param="prompt")
        return self.tokenizer.encode(prompt)

    @property
    def template(self) -> ChatTemplate:
        """The model's chat template (an error for a base model that has none)."""
        return self._template()

    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise InvalidRequestError(
                f"model {self.name!r} has no chat template (a base model); use generate/completions with plain text",
                param="messages",
            )
        return self.chat_template

    # --- generation --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode_perplexity(self, ids: Sequence[int]) -> float:
        """Teacher-forced perplexity of `ids`, fed one token at a time through the step generation decodes with
        (the engine's native step where it applies, so int8-quantised activations are scored too)."""
        c = self.model.config
        slots = SlotCache(c.n_layers, c.n_kv_heads, c.head_dim, dtype=self.dtype, device=self.model.embed_tokens.weight.device)
        slots.reserve(1, len(ids) + 8)
        decoder = self.engine.runner.native
        nll = 0.0
        self.model(torch.tensor([ids[:1]]), slots.row(0))
        for i in range(1, len(ids) - 1):
            tok = torch.tensor([[ids[i]]])
            logits = decoder.decode(tok, slots, 1) if decoder is not None else self.model(tok, slots.decode(1))[:, -1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor([ids[i + 1]]), reduction="sum").item()
        return math.exp(nll / (len(ids) - 2))

    def generate(self, prompt: str, params: SamplingParams | None = None, *, adapter: str | None = None,
                 **overrides: Any) -> Completion:
        """Continue `prompt` (plain text, no chat template)."""
        return self._collect(self.encode_prompt(prompt), _params(params, overrides), adapter)

    def stream(self, prompt: str, params: SamplingParams | None = None, **overrides: Any) -> Iterator[str]:
        for delta in self.stream_ids(self.encode_prompt(prompt), _params(params, overrides)):
            if delta.text:
                yield delta.text

    def chat(self, messages: Sequence[Message], params: SamplingParams | None = None, *, adapter: str | None = None,
             **overrides: Any) -> Completion:
        """Answer the last message of a conversation ([{"role": ..., "content": ...}, ...]).

        `adapter`: the name of a LoRA adapter added with `load_adapter` (None: the base model)."""
        return self._collect(self.encode_chat(messages), _params(params, overrides), adapter)

    def stream_chat(self, messages: Sequence[Message], params: SamplingParams | None = None, **overrides: Any) -> Iterator[str]:
        for delta in self.stream_ids(self.encode_chat(messages), _params(params, overrides)):
            if delta.text:
                yield delta.text

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Iterator[Delta]:
        """The core: prompt token ids in, text deltas out (UTF-8 safe, stop strings removed)."""
        self.engine.validate(prompt_ids, params)
        text = TextStream(self.tokenizer, params.stop)
        with self._lock:
            events = self.engine.generate(prompt_ids, params, adapter)
            try:
                for event in events:
                    delta = text.push(event)
                    yield delta
                    if delta.finish_reason is not None:
                        return
            finally:
                events.close()

    def _collect(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Completion:
        text, ids, logprobs, finish, cached = [], [], [], "length", 0
        for delta in self.stream_ids(prompt_ids, params, adapter):
            cached = delta.cached_tokens
            text.append(delta.text)
            ids += delta.token_ids
            logprobs += delta.logprobs
            finish = delta.finish_reason or finish
        return Completion(
            text="".join(text),
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(ids),
            cached_tokens=cached,
            token_ids=ids,
            logprobs=logprobs if params.logprobs is not None else None,
        )


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    """`SamplingParams` from an object and/or keyword overrides (unknown names are a TypeError)."""
    base = params or SamplingParams()
    return replace(base, **overrides) if overrides else base
