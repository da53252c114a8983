"""What the wire-format models of every API room share, so that validation, the published OpenAPI schema
and the bytes sent all come from one declaration.

- `WireModel`: the base of response and stream-chunk models. A field typed `X | MISSING` (pydantic's
  sentinel) is left out of the JSON until it is set, the way OpenAI omits some fields rather than sending
  null; the published schema marks every other field as required, because it is always sent.
- `unsupported(neutral, feature)`: an OpenAI field Lamina does not implement yet, accepted only at its
  neutral value (absent, null, empty, "none"); anything else is a 400 naming the field, so a client never
  believes a feature worked when it was ignored. The schema publishes the neutral values.
- `Needs`, `OneOf`: rules between fields ("top_logprobs needs logprobs: true"), each checked by the request
  model and published as JSON Schema (`if`/`then`, `oneOf`) from the same object. A rule JSON Schema cannot
  state (one field equal to another) is checked by a validator and documented on its field.
- `ErrorResponse`: OpenAI's error envelope, for every error body and a failed stream's last event.
- `event_stream(chunk)`: the published 200 of a route that streams `chunk`s as Server-Sent Events.
- `NON_BLANK`: the pattern of a text that holds something besides white space (Python's `str.isspace`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    MISSING,
    BaseModel,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from lamina.errors import InvalidRequestError, LaminaError

# Python's white space (str.isspace), spelled so that Python's re, pydantic's Rust regex and the ECMA
# regexes of JSON Schema validators all read the same class: a value matching this holds a character that
# `str.strip()` keeps.
NON_BLANK = r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NON_BLANK = re.compile(NON_BLANK)


def non_blank(text: str) -> bool:
    return _NON_BLANK.search(text) is not None


class WireModel(BaseModel):
    """A response or stream chunk. Its published schema requires every field that is always sent."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: Any) -> JsonSchemaValue:
        schema = handler(core_schema)
        if handler.mode == "serialization":
            target = handler.resolve_ref_schema(schema)
            target["required"] = [name for name, f in cls.model_fields.items() if f.default is not MISSING]
        return schema


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: the body of every 4xx/5xx, and the last event of a stream that failed."""

    error: ErrorBody

    @classmethod
    def of(cls, exc: LaminaError) -> ErrorResponse:
        return cls(error=ErrorBody(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code))

    @classmethod
    def internal(cls) -> ErrorResponse:
        """What an unexpected exception becomes: nothing about the internals."""
        return cls(error=ErrorBody(message="The server had an internal error; it has been logged.", type="server_error", param=None, code="internal_error"))


def unsupported(neutral: Any, feature: str, message: Callable[[Any], str] | None = None) -> Any:
    """The type of a field Lamina accepts only at a neutral value (`neutral`: the type of those values).

    Anything else is refused with "'<field>' is not supported by Lamina yet (<feature>); remove the field"
    (or `message(value)`), and the schema publishes `neutral` itself."""
    adapter: TypeAdapter[Any] = TypeAdapter(neutral)

    def refuse(value: Any, info: ValidationInfo) -> Any:
        try:
            return adapter.validate_python(value)
        except ValidationError:
            name = info.field_name or "?"
            text = message(value) if message else f"'{name}' is not supported by Lamina yet ({feature}); remove the field"
            raise InvalidRequestError(text, param=name) from None

    return Annotated[neutral, BeforeValidator(refuse), Field(description=f"Not supported by Lamina yet ({feature}): "
                                                                          "accepted only at a neutral value, as published.")]


EMPTY = None | Annotated[list[Any], Field(max_length=0)] | Annotated[dict[str, Any], Field(max_length=0)]
"""The neutral values of most unsupported fields: absent, null, [] or {}."""


def _given(name: str) -> dict[str, Any]:
    """JSON Schema: `name` is present and not null."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


@dataclass(frozen=True)
class Needs:
    """`field`, when given (not null), needs `other` to be `value`; else a 400 with `message`."""

    field: str
    other: str
    value: Any
    message: str
    param: str | None = None
    """The field the 400 names (default: `field`)."""

    def check(self, model: BaseModel) -> None:
        if getattr(model, self.field) is not None and getattr(model, self.other) != self.value:
            raise InvalidRequestError(self.message, param=self.param or self.field)

    def schema(self, model: type[BaseModel]) -> dict[str, Any]:
        then: dict[str, Any] = {"properties": {self.other: {"const": self.value}}}
        if model.model_fields[self.other].default != self.value:
            then["required"] = [self.other]
        return {"if": _given(self.field), "then": then}


@dataclass(frozen=True)
class OneOf:
    """Exactly one of `fields` is given (not null)."""

    fields: tuple[str, ...]
    message: str

    def check(self, model: BaseModel) -> None:
        if sum(getattr(model, f) is not None for f in self.fields) != 1:
            raise InvalidRequestError(self.message, param=self.fields[0])

    def schema(self, model: type[BaseModel]) -> dict[str, Any]:
        return {"oneOf": [_given(f) for f in self.fields]}


Rule = Needs | OneOf


def _publish_rules(schema: dict[str, Any], model: type[BaseModel]) -> None:
    rules: Iterable[Rule] = getattr(model, "rules", ())
    if rules:
        schema.setdefault("allOf", []).extend(rule.schema(model) for rule in rules)


class RuledModel(BaseModel):
    """A request model with `rules` between its fields: checked after validation, published in its schema."""

    model_config = {"json_schema_extra": _publish_rules}
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> RuledModel:
        for rule in self.rules:
            rule.check(self)
        return self


def event_stream(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry of a route that answers with JSON or, with `stream: true`, Server-Sent Events of
    `chunk`s: published under `text/event-stream` beside the JSON body (the chunk's schema inlined there, as
    FastAPI's component schemas only hold the models of JSON bodies)."""
    data = {"anyOf": [{"type": "string", "contentMediaType": "application/json",
                       "contentSchema": {"anyOf": [_inline(chunk), _inline(ErrorResponse)]}},
                      {"const": "[DONE]"}],
            "description": "Each event is `data: <chunk>`; an error ends a stream as `data: {\"error\": ...}`; then `data: [DONE]`."}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"content": {"text/event-stream": {"itemSchema": event}},
                  "description": "The response; with `stream: true`, Server-Sent Events of chunks instead."}}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's (serialization) schema with its `$defs` spelled out in place."""
    schema = model.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return inline(defs[ref.rsplit("/", 1)[-1]]) if ref.startswith("#/$defs/") else {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)
