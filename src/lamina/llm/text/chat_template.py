"""Chat templates: a checkpoint's Jinja2 template rendered as `transformers`' `apply_chat_template` does.

The template comes from the GGUF (`tokenizer.chat_template`) or the Hugging Face folder (tokenizer_config.json
or chat_template.jinja). It is untrusted code, so it runs in Jinja's immutable sandbox with the same globals
and filters transformers gives it (`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML,
the `{% generation %}` block) and the same whitespace rules (`trim_blocks`, `lstrip_blocks`).

`encode` goes one step further than a plain render-then-tokenize: special tokens typed *inside* messages
are encoded as ordinary text, so a user cannot forge `<|im_end|>` and start a turn of their own (the
`sanitize_control_tokens=True` behaviour of transformers). Only the template's own tokens are control tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lamina.errors import InvalidRequestError, ModelFormatError
from lamina.foundation.tokenizer import Tokenizer

Message = Mapping[str, Any]

# Private-use code points that wrap special tokens found in user text (never produced by tokenizers).
_START, _END = "\U000f0000", "\U000f0001"
# ... and the text a template marks with {% generation %} (assistant text, for loss masking).
_GEN_START, _GEN_END = "\U000f0002", "\U000f0003"
_PRIVATE = (_START, _END, _GEN_START, _GEN_END)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for loss masking); renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's API)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return f"{_GEN_START}{caller()}{_GEN_END}"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, tokenizer: Tokenizer) -> None:
        self.source = source
        self.tokenizer = tokenizer
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFormatError(f"the model's chat template does not parse: {e.message} (line {e.lineno})") from None

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        keep_generation_marks: bool = False,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (each a dict with `role` and `content`)."""
        check_messages(messages)
        variables = {**self.tokenizer.special_tokens_map(), **extra}
        try:
            text = self._template.render(
                messages=[_plain(_flatten_text_parts(m)) for m in messages],
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the model's chat template rejected these messages: {e}", param="messages") from None
        return text if keep_generation_marks else text.replace(_GEN_START, "").replace(_GEN_END, "")

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Token ids of the rendered chat, with special tokens inside message text encoded as plain text."""
        check_messages(messages)
        pattern = self._special_pattern
        marked = [_mark(m, pattern) for m in messages] if pattern else messages
        return self._encode_rendered(self.render(marked, add_generation_prompt=add_generation_prompt, **extra))

    def encode_with_mask(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and, for each, whether it is assistant text (trained on).

        The assistant tokens are each assistant message's content and the end-of-turn tokens the template puts
        after it (so a fine-tuned model learns to stop). They are found from the template's
        `{% generation %}` marks when it has them (as transformers' `return_assistant_tokens_mask`);
        otherwise by rendering the conversation turn by turn, which works when every rendering is a prefix
        of the next (true of ChatML templates like SmolLM2's, Llama 3's and Qwen's). A template for which
        neither holds is refused with an explanation, rather than training on the wrong tokens.
        """
        check_messages(messages)
        pattern = self._special_pattern
        marked = [_mark(m, pattern) if pattern else _strip_private(m) for m in messages]
        if _GENERATION_TAG.search(self.source):
            text = self.render(marked, add_generation_prompt=False, keep_generation_marks=True)
            pieces = re.split(f"([{_GEN_START}{_GEN_END}])", text)
            segments, inside = [], False
            for piece in pieces:
                if piece in (_GEN_START, _GEN_END):
                    inside = piece == _GEN_START
                elif piece:
                    segments.append((piece, inside))
        else:
            segments = self._turn_segments(marked)
        ids: list[int] = []
        mask: list[bool] = []
        for piece, trained in segments:
            piece_ids = self._encode_rendered(piece)
            ids += piece_ids
            mask += [trained] * len(piece_ids)
        return ids, mask

    def _turn_segments(self, messages: list[Any]) -> list[tuple[str, bool]]:
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise InvalidRequestError(
                    "cannot find the assistant tokens for assistant-only loss: this model's chat template renders "
                    "earlier turns differently once later turns are added (it may drop reasoning or add dates), so "
                    "turn-by-turn rendering does not locate them. Wrap the assistant content in the template with "
                    "{% generation %}...{% endgeneration %} (the marks transformers and TRL use for "
                    "assistant_only_loss), or train on whole sequences with --no-assistant-only-loss",
                    param="chat_template",
                )
            spans.append((len(before), len(through)))
        segments, at = [], 0
        for start, end in spans:
            if start > at:
                segments.append((full[at:start], False))
            segments.append((full[start:end], True))
            at = end
        if at < len(full):
            segments.append((full[at:], False))
        return segments

    def _encode_rendered(self, text: str) -> list[int]:
        """Encode rendered template text, in which special tokens from messages are wrapped in markers."""
        pattern = self._special_pattern
        if not pattern:
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids: list[int] = []
        # Split gives [template text, marked token, template text, ...]; stray markers just split the text.
        pieces = re.split(f"{_START}({pattern.pattern}){_END}|[{_START}{_END}]", text)
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            if i % 2:
                ids += self._plain_text_ids(piece)
            else:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids

    @cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        tokens = sorted({self.tokenizer.id_to_token(i) or "" for i in self.tokenizer.special_ids} - {""}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def _plain_text_ids(self, text: str) -> list[int]:
        return self._plain_tokenizer.encode(text, add_special_tokens=False).ids

    @cached_property
    def _plain_tokenizer(self) -> Any:
        """A copy of the backend that splits special-token strings like any other text."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self.tokenizer.backend.to_str())
        backend.encode_special_tokens = True
        return backend


def check_messages(messages: Sequence[Message]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InvalidRequestError(f"messages[{i}] must be an object with a 'role' (got {m!r:.80})", param="messages")


def _flatten_text_parts(message: Message) -> Message:
    """OpenAI-style content parts [{"type": "text", "text": ...}, ...] become one string, as most templates expect."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return {**message, "content": "".join(str(p.get("text", "")) for p in content)}
    return message


def _plain(value: Any) -> Any:
    """Plain JSON data for the sandbox: dicts, lists and scalars only; None values dropped from dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _strip_private(value: Any) -> Any:
    if isinstance(value, str):
        for ch in _PRIVATE:
            value = value.replace(ch, "")
        return value
    if isinstance(value, Mapping):
        return {k: _strip_private(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strip_private(v) for v in value]
    return value


def _mark(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        for ch in _PRIVATE:
            value = value.replace(ch, "")
        return pattern.sub(lambda m: f"{_START}{m.group(0)}{_END}", value)
    if isinstance(value, Mapping):
        return {k: _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mark(v, pattern) for v in value]
    return value
