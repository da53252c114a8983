"""Request and response models of the OpenAI-compatible API, with OpenAI's field names.

Requests accept unknown fields (SDKs add new ones; vLLM does the same) but refuse, with a 400 naming the
field, the OpenAI features Lamina does not implement yet (tools, structured output, ...): a client must never
believe a feature worked when it was silently ignored. Lamina's extras (`top_k`, `min_p`,
`repetition_penalty`) arrive through the SDK's `extra_body`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lamina.errors import InvalidRequestError

# Fields OpenAI defines that Lamina does not implement: present (and not at their neutral value) -> 400.
_UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "parallel_tool_calls": "tool calling",
    "logit_bias": "logit_bias",
    "audio": "audio output",
    "modalities": "output modalities other than text",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort (this model does not reason)",
    "suffix": "suffix (fill-in-the-middle)",
}


def _neutral(name: str, value: Any) -> bool:
    if value is None or value == [] or value == {}:
        return True
    if name == "tool_choice":
        return value == "none"
    if name == "modalities":
        return value == ["text"]
    return name == "parallel_tool_calls"  # meaningless without tools, which are refused on their own


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        extra = self.model_extra or {}
        for name, feature in _UNSUPPORTED.items():
            if name in extra and not _neutral(name, extra[name]):
                raise InvalidRequestError(f"'{name}' is not supported by Lamina yet ({feature}); remove the field", param=name)
        response_format = extra.get("response_format")
        if response_format not in (None, {"type": "text"}):
            kind = response_format.get("type") if isinstance(response_format, dict) else response_format
            raise InvalidRequestError(
                f"response_format {kind!r} is not supported by Lamina yet; only {{'type': 'text'}}", param="response_format"
            )
        return self

    def unknown_fields(self) -> list[str]:
        known = {"response_format", "store", "metadata", "service_tier", "stream_options", *_UNSUPPORTED}
        return sorted(set(self.model_extra or {}) - known)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extras (vLLM names), sent through `extra_body`
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    cache_salt: str | None = Field(default=None, max_length=256)
    """vLLM's: prefix-cache reuse only between requests with the same salt (on top of the API key's own)."""

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or any(not s for s in stops):
            raise InvalidRequestError("stop must be up to 16 non-empty strings", param="stop")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    # Lamina's grounded chat (through `extra_body`): retrieve from these vector stores and cite.
    vector_store_ids: list[str] | None = Field(default=None, max_length=8)
    max_num_results: int = Field(default=4, ge=1, le=20)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_messages(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                raise InvalidRequestError(f"messages[{i}]: role '{m.role}' needs tool calling, which Lamina does not support yet", param="messages")
            if isinstance(m.content, list):
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise InvalidRequestError(
                            f"messages[{i}]: content part type '{part.type}' is not supported; only 'text' parts", param="messages"
                        )
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates want them: plain string content; `developer` is `system`."""
        out = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for the legacy endpoint
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported by Lamina yet", param="best_of")
        if self.prompt == [] or self.prompt == "":
            raise InvalidRequestError("prompt is empty: give some text or token ids", param="prompt")
        return self


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# --- responses (for the OpenAPI schema; handlers build plain dicts of the same shape) -----------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamina"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    task: Literal["generate", "embed"] | None = None
    """Lamina's addition: what the model is for (the web chat offers only `generate` models)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
