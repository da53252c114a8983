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


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for loss masking); renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's API)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


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
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (each a dict with `role` and `content`)."""
        check_messages(messages)
        variables = {**self.tokenizer.special_tokens_map(), **extra}
        try:
            return self._template.render(
                messages=[_plain(_flatten_text_parts(m)) for m in messages],
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the model's chat template rejected these messages: {e}", param="messages") from None

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Token ids of the rendered chat, with special tokens inside message text encoded as plain text."""
        check_messages(messages)
        pattern = self._special_pattern
        marked = [_mark(m, pattern) for m in messages] if pattern else messages
        text = self.render(marked, add_generation_prompt=add_generation_prompt, **extra)
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


def _mark(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        value = value.replace(_START, "").replace(_END, "")
        return pattern.sub(lambda m: f"{_START}{m.group(0)}{_END}", value)
    if isinstance(value, Mapping):
        return {k: _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mark(v, pattern) for v in value]
    return value
