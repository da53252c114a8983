"""The Python API for text generation: `LLM.load(...)`, then `generate`, `stream`, `chat`, `stream_chat`.

    from lamina import LLM
    llm = LLM.load("smollm2-135m-instruct")
    print(llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], temperature=0).text)
    for piece in llm.stream_chat([{"role": "user", "content": "Tell me a story"}], max_tokens=200):
        print(piece, end="", flush=True)

    async for delta in llm.astream(llm.encode_chat(messages), SamplingParams(max_tokens=64)):   # asyncio code
        ...

    class City(pydantic.BaseModel):
        name: str
        country: str
    llm.chat(messages, response_format=City).parsed         # City(name=..., country=...): decoding follows its schema

This layer owns text: tokenizing, chat templates, incremental detokenizing and stop strings. The engine
underneath sees token ids only, and is driven by one worker thread (`AsyncEngine`): the async methods are
the core, the synchronous ones take the same events from a thread-safe queue (`AsyncEngine.generate_sync`)
through the same text stream, so the Python API, the CLI and the server run requests through the same
path, batched together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lamina.arch import build_model
from lamina.errors import InvalidRequestError
from lamina.foundation.tokenizer import Tokenizer
from lamina.infra.device import optimize_for_inference, resolve_device, resolve_dtype
from lamina.infra.registry import ModelEntry, Registry
from lamina.llm.engine.async_engine import AsyncEngine
from lamina.llm.engine.core import Engine, EngineArgs, FinishReason, TokenEvent
from lamina.llm.engine.grammar import Grammars, StructuredOutput, closed
from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.formats import gguf
from lamina.llm.formats.loader import read_checkpoint
from lamina.llm.kernels import native as native_kernels
from lamina.llm.kernels.native import DEFAULT_OPTIONS, NativeOptions
from lamina.llm.kernels.quant import quantize_model
from lamina.llm.text.chat_template import ChatTemplate, Message
from lamina.llm.text.stream import Delta, TextStream, TokenLogprob
from lamina.llm.text.tools import (
    Tool,
    ToolCall,
    ToolChoice,
    ToolFormat,
    check_tool_messages,
    detect_format,
    split_calls,
    tool_choice_from_openai,
    tools_from_openai,
)
from lamina.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason | Literal["tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    parsed: Any = None
    """With `response_format=` a pydantic model class: the text validated into an instance of it (None when the
    output was cut short by max_tokens)."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """With `tools=`: the calls the model made (`text` is then the content around them)."""


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools: the format, the tools, the choice and the grammar that enforces it."""

    format: ToolFormat
    tools: list[Tool]
    choice: ToolChoice
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.choice.mode != "none" and bool(self.tools)

    def grammar(self) -> StructuredOutput | None:
        return self.format.grammar(self.tools, self.choice, self.parallel)

    def finish_reason(self, calls: Sequence[ToolCall], finish: str) -> str:
        """OpenAI's: tool_calls when calls were made under auto or required, stop under a named choice."""
        if not calls or finish == "length":
            return finish
        return "stop" if self.choice.mode == "function" else "tool_calls"


def structured_output(response_format: Any, param: str = "response_format") -> StructuredOutput | None:
    """A `StructuredOutput` from what users pass: a pydantic model class, a JSON Schema (dict), an OpenAI
    `response_format` ({"type": "json_schema", "json_schema": {"schema": ...}}, {"type": "json_object"},
    {"type": "text"}), or a `StructuredOutput` itself. None for no constraint."""
    if response_format is None or isinstance(response_format, StructuredOutput):
        return response_format
    schema_of = getattr(response_format, "model_json_schema", None)
    if isinstance(response_format, type) and callable(schema_of):
        return StructuredOutput("json_schema", closed(schema_of()), param)  # as the OpenAI SDK's parse() sends it
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutput("json_object", None, param)
        if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            spec = response_format["json_schema"]
            if "schema" not in spec:
                return StructuredOutput("json_object", None, param)
            return StructuredOutput("json_schema", closed(spec["schema"]) if spec.get("strict") else spec["schema"], param)
        return StructuredOutput("json_schema", response_format, param)
    raise InvalidRequestError(f"response_format must be a pydantic model class, a JSON schema or an OpenAI response_format, "
                              f"not {type(response_format).__name__}", param=param)


QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")


@dataclass(frozen=True)
class Precision:
    """What a model is served in: floats of `dtype`, and the weight-only quantisation on top (None: none)."""

    dtype: str
    quantize: str | None
    reason: str
    """Why, in a sentence (`lamina info` shows it)."""


def resolve_precision(
    entry: ModelEntry, device: torch.device, dtype: str | None = None, quantize: str = "auto", native: NativeOptions = DEFAULT_OPTIONS,
) -> Precision:
    """The precision `LLM.load` serves `entry` in.

    `quantize="auto"` (the default) serves a GGUF whose block weights are all Q4_1 (or all Q8_0) on those very
    blocks, as int4 (int8): the weights are exactly the file's, decoding reads 4x (2x) fewer bytes than bfloat16,
    and the perplexity stays within the bars `test_smollm2_quantised_quality_and_batching` holds it to. It
    does so on CPU, where the native kernels run, and only when no dtype was asked for: `dtype="bfloat16"`
    (`--dtype`) is the way to floats, as is `quantize="none"`. Anything else is served in floats of `dtype`.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidRequestError(f"unknown quantisation {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}", param="quantize")
    floats = dtype or "auto"
    if quantize in ("int8", "int4"):
        return Precision(floats, quantize, f"{quantize} asked for")
    if quantize == "none":
        return Precision(floats, None, "quantisation switched off (quantize none)")
    if floats != "auto":
        return Precision(floats, None, f"dtype {floats} asked for, so floats")
    if entry.format != "gguf":
        return Precision(floats, None, "not a GGUF file, so no stored blocks to serve: floats")
    if device.type != "cpu":
        return Precision(floats, None, f"the native block kernels run on CPU, not {device.type}: floats")
    unavailable = native_kernels.unavailable_reason(native)
    if unavailable:
        return Precision(floats, None, f"the native kernels are unavailable ({unavailable}): floats")
    block = gguf.native_block_type(gguf.open_gguf(entry.path))
    if block is None:
        return Precision(floats, None, "the GGUF's weights are not all Q4_1 or all Q8_0 blocks: floats")
    mode = "int4" if block == "Q4_1" else "int8"
    return Precision(floats, mode, f"the GGUF's own {block} blocks, bit for bit, on the native kernels; --dtype or "
                                   "--quantize none for floats")


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
        native: NativeOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.entry = entry
        self.config = model.config
        self.chat_template = ChatTemplate(chat_template, tokenizer) if chat_template else None
        eos = tokenizer.eos_id if tokenizer.eos_id in eos_ids else next(iter(eos_ids), tokenizer.eos_id)
        grammars = Grammars(tokenizer.backend.to_str(), eos, self.config.vocab_size) if eos is not None else None
        self.engine = AsyncEngine(Engine(
            model, eos_ids=eos_ids, max_seq_len=self.config.max_seq_len, vocab_size=self.config.vocab_size, args=engine_args,
            cache_dir=cache_dir, native=native, grammars=grammars,
        ))
        """The engine's one driver; its worker thread starts with the first request."""

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
        settings: Settings | None = None,
    ) -> LLM:
        """Load a model by id (see `lamina models`), .gguf path or Hugging Face folder.

        device: auto|cpu|cuda|cuda:N|mps; dtype: auto|float32|bfloat16|float16 (auto: fastest measured
        here); quantize: auto|none|int8|int4 (auto: a GGUF's own Q4_1/Q8_0 blocks where the native kernels
        run and no dtype is given, see `resolve_precision`). Unset arguments come from `settings`; without
        those, from a `Settings()` read now from the environment (LAMINA_MODEL, LAMINA_DEVICE, LAMINA_DTYPE,
        LAMINA_QUANTIZE, LAMINA_HOME).
        """
        settings = settings or Settings()
        home = Path(home).expanduser() if home else settings.home
        entry = Registry(home).resolve(model or settings.model)
        dev = resolve_device(device or settings.device)
        native = NativeOptions.from_settings(settings)
        asked = dtype or (settings.dtype if settings.dtype != "auto" else None)
        precision = resolve_precision(entry, dev, asked, quantize or settings.quantize, native)
        cache = settings.cache_for(home)
        dt = resolve_dtype(precision.dtype, dev, cache)
        ckpt = read_checkpoint(entry, dt)
        net = build_model(ckpt.config, ckpt.state_dict, device=dev, dtype=dt).eval()
        del ckpt.state_dict
        optimize_for_inference(net, dev, cache)
        if precision.quantize:
            stored = gguf.native_blocks(gguf.open_gguf(entry.path), ckpt.config) if entry.format == "gguf" else None
            automatic = (quantize or settings.quantize) == "auto"
            try:
                quantize_model(net, precision.quantize, cache, stored, native, native_only=automatic)  # type: ignore[arg-type]
            except InvalidRequestError as e:  # measured slower than floats here: auto keeps the floats
                if not automatic:
                    raise
                precision = replace(precision, quantize=None, reason=f"{precision.quantize} measured slower here ({e})")
        logger.info("loaded %s (%s) on %s in %s, %s: %s", entry.id, ckpt.config.family, dev, dt,
                    precision.quantize or "no quantisation", precision.reason)
        return cls(
            net, ckpt.tokenizer, name=entry.id, eos_ids=ckpt.eos_ids, chat_template=ckpt.chat_template, entry=entry,
            engine_args=engine_args, cache_dir=cache, native=native,
        )

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Add the LoRA adapter (PEFT layout) in `path` under `name`; requests choose it with `adapter=name`.

        The base model stays the default: adapters apply only to the requests that ask for them, and requests
        for different adapters share one batch. On a quantised model the adapters run in float32 beside the
        int8/int4 weights (QLoRA-style). An adapter trained for another base model is refused.
        """
        from lamina.arch.lora import set_active_adapter
        from lamina.llm.formats.peft import load_adapter

        if name == self.name or name in self.engine.adapters:
            raise InvalidRequestError(f"the name {name!r} is already taken; give each adapter its own name", param="lora")

        def load(engine: Engine) -> None:  # on the engine's thread, between steps: the model changes under it
            load_adapter(self.model, path, adapter_name=name, base_model_id=self.entry.id if self.entry else None)
            set_active_adapter(self.model, None)
            engine.runner.refresh_adapters()

        self.engine.call(load)

    @property
    def adapters(self) -> list[str]:
        return sorted(self.engine.adapters)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- prompts -----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._template().render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: ToolPlan | None = None) -> list[int]:
        """The prompt of a conversation; with `tools` (`tool_plan`), the tools shown the way this template takes
        them and earlier calls and results rendered in its format."""
        if tools is None and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            return self._template().encode(messages, add_generation_prompt=add_generation_prompt)
        fmt = tools.format if tools is not None else self.tool_format
        shown = tools.tools if tools is not None and tools.active else []
        check_tool_messages(messages)
        rendered, listing = fmt.messages(messages, shown)
        return self._template().encode(rendered, add_generation_prompt=add_generation_prompt, tools=listing)

    @cached_property
    def sampling_defaults(self) -> dict[str, float]:
        """The sampling the checkpoint suggests (temperature, top_p, top_k, repetition_penalty of a Hugging Face
        folder's generation_config.json), else what its model card does (the registry), else nothing."""
        keys = ("temperature", "top_p", "top_k", "repetition_penalty")
        if self.entry is None:
            return {}
        gen = self.entry.path / "generation_config.json" if self.entry.path.is_dir() else None
        if gen is not None and gen.exists():
            try:
                config = json.loads(gen.read_text(encoding="utf-8"))
            except ValueError:
                config = {}
            found = {k: float(config[k]) for k in keys if isinstance(config.get(k), int | float) and not isinstance(config.get(k), bool)}
            if found:
                return found
        return {k: float(v) for k, v in self.entry.sampling.items() if k in keys}

    @cached_property
    def tool_format(self) -> ToolFormat:
        """How this model's chat template takes tools (`lamina.llm.text.tools.detect_format`)."""
        template = self._template()
        return detect_format(lambda messages, tools: template.render(messages, tools=tools))

    def tool_plan(self, tools: Sequence[Any] | None, tool_choice: Any = None, parallel_tool_calls: bool | None = True) -> ToolPlan | None:
        """A `ToolPlan` from OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` (checked: a 400 for bad ones),
        or None without tools."""
        listed = tools_from_openai(tools) if tools else []
        choice = tool_choice_from_openai(tool_choice, listed)
        if not listed:
            return None
        return ToolPlan(self.tool_format, listed, choice, parallel_tool_calls is not False)

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

    def decode_perplexity(self, ids: Sequence[int]) -> float:
        """Teacher-forced perplexity of `ids`, fed one token at a time through the step generation decodes with
        (the engine's native step where it applies, so int8-quantised activations are scored too)."""
        return self.engine.call(lambda engine: engine.runner.decode_perplexity(ids))

    def validate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> None:
        """Raise the error a request would get (bad ids, context too long, unknown adapter), before streaming."""
        self.engine.validate(prompt_ids, params, adapter)

    def check_capacity(self) -> None:
        """Refuse (503) when the engine's queue is full."""
        self.engine.check_capacity()

    def close(self) -> None:
        """Abort what is running and stop the engine's worker thread."""
        self.engine.shutdown()

    def generate(self, prompt: str, params: SamplingParams | None = None, *, adapter: str | None = None,
                 response_format: Any = None, **overrides: Any) -> Completion:
        """Continue `prompt` (plain text, no chat template); `response_format` as in `chat`."""
        return self._collect(self.encode_prompt(prompt), _params(params, overrides, response_format), adapter, response_format)

    def stream(self, prompt: str, params: SamplingParams | None = None, **overrides: Any) -> Iterator[str]:
        for delta in self.stream_ids(self.encode_prompt(prompt), _params(params, overrides)):
            if delta.text:
                yield delta.text

    def chat(self, messages: Sequence[Message], params: SamplingParams | None = None, *, adapter: str | None = None,
             response_format: Any = None, tools: Sequence[Any] | None = None, tool_choice: Any = None,
             parallel_tool_calls: bool = True, **overrides: Any) -> Completion:
        """Answer the last message of a conversation ([{"role": ..., "content": ...}, ...]).

        `adapter`: the name of a LoRA adapter added with `load_adapter` (None: the base model).
        `response_format`: what the answer must be (`structured_output`): a pydantic model class (the answer
        is then also `parsed` into it), a JSON Schema, or an OpenAI response_format. The schema constrains the
        decoding but is not shown to the model: say in the prompt what you want.
        `tools`: OpenAI function tools ({"type": "function", "function": {"name", "description", "parameters"}});
        `tool_choice`: none, auto (the default with tools), required, or {"type": "function", "function": {"name": ...}}.
        The calls come back in `tool_calls`, their arguments valid against their schemas."""
        plan = self.tool_plan(tools, tool_choice, parallel_tool_calls)
        sampling = _params(params, overrides, response_format)
        if plan is not None and plan.active:
            if sampling.structured is not None:
                raise InvalidRequestError("give response_format or tools, not both (each constrains the whole answer)",
                                          param="response_format")
            sampling = replace(sampling, structured=plan.grammar())
        done = self._collect(self.encode_chat(messages, tools=plan), sampling, adapter, response_format)
        if plan is None or not plan.active:
            return done
        content, calls = split_calls(plan.format, done.text)
        return replace(done, text=content, tool_calls=calls, finish_reason=plan.finish_reason(calls, done.finish_reason))  # type: ignore[arg-type]

    def stream_chat(self, messages: Sequence[Message], params: SamplingParams | None = None, **overrides: Any) -> Iterator[str]:
        for delta in self.stream_ids(self.encode_chat(messages), _params(params, overrides)):
            if delta.text:
                yield delta.text

    async def astream(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                      cache_salt: str = "", adapter: str | None = None) -> AsyncIterator[Delta]:
        """The core: prompt token ids in, text deltas out (UTF-8 safe, stop strings cut); the last delta carries
        the finish reason. Leaving early aborts the request. `cache_salt` scopes prefix reuse (a tenant)."""
        text = TextStream(self.tokenizer, params.stop)
        events = self.engine.generate(prompt_ids, params, request_id, cache_salt, adapter)
        try:
            async for event in events:
                delta = text.push(event)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Iterator[Delta]:
        """`astream` for synchronous code."""
        text = TextStream(self.tokenizer, params.stop)
        events = self.engine.generate_sync(prompt_ids, params, adapter)
        try:
            for event in events:
                delta = text.push(event)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            events.close()  # type: ignore[attr-defined]

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Iterator[TokenEvent]:
        """The engine's token events for one request, without text (benchmarks, parity tests)."""
        return self.engine.generate_sync(prompt_ids, params, adapter)

    def _collect(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                 response_format: Any = None) -> Completion:
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
            parsed=_parse(response_format, "".join(text)) if finish == "stop" else None,
        )


def _parse(response_format: Any, text: str) -> Any:
    validate = getattr(response_format, "model_validate_json", None)
    return validate(text) if isinstance(response_format, type) and callable(validate) else None


def _params(params: SamplingParams | None, overrides: dict[str, Any], response_format: Any = None) -> SamplingParams:
    """`SamplingParams` from an object and/or keyword overrides (unknown names are a TypeError)."""
    base = params or SamplingParams()
    structured = structured_output(response_format)
    if structured is not None:
        overrides = {**overrides, "structured": structured}
    return replace(base, **overrides) if overrides else base
