"""Request, response and stream-chunk models of the OpenAI-compatible API, with OpenAI's field names: the one
source of the wire format. The routes validate with them and publish them in /openapi.json, and the service
builds every response and every Server-Sent Event from them.

Requests accept unknown fields (SDKs add new ones; vLLM does the same) but refuse, with a 400 naming the
field, the OpenAI features Lamina does not implement yet (logit_bias, audio, ...): a client must never
believe a feature worked when it was silently ignored. Structured outputs come as OpenAI's `response_format`
(json_object, json_schema), vLLM's `structured_outputs` (json, regex, choice, grammar) or vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`: one of them per request. The schema says what is accepted: ranges, lengths,
the neutral values of the unsupported fields and the rules between fields. What depends on the loaded model
cannot be published and is documented on the field instead: prompt plus `max_tokens` must fit the model's
context (`max_model_len` in /v1/models, else 400 `context_length_exceeded`), token ids must be below its
vocabulary size, and its chat template may refuse a conversation. Lamina's extras (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `speculative_tokens`, `cache_salt`, `vector_store_ids`) arrive through the SDK's `extra_body`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import MISSING, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from lamina.api.wire import EMPTY, Needs, OneOf, RuledModel, WireModel, unsupported
from lamina.errors import InvalidRequestError
from lamina.llm.engine.grammar import StructuredOutput, closed

MAX_N = 16
TokenId = Annotated[int, Field(ge=0, description="A token id, below the model's vocabulary size.")]
Stop = Annotated[str, Field(min_length=1)]


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema",
                                           description="The JSON Schema the output follows; absent: any JSON object.")
    strict: bool | None = Field(default=None, description="True: objects without additionalProperties are closed, as OpenAI's strict mode has them.")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json", description="A JSON Schema (object or its text).")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, description="A context-free grammar: Lark (llguidance's), or GBNF (with ::=).")
    json_object: bool | None = None


class _Request(RuledModel):
    model_config = ConfigDict(extra="allow")

    # OpenAI's fields that Lamina does not implement: accepted at their neutral values only.
    tools: unsupported(EMPTY, "tool calling") = None
    tool_choice: unsupported(EMPTY | Literal["none"], "tool calling") = None
    functions: unsupported(EMPTY, "function calling") = None
    function_call: unsupported(EMPTY, "function calling") = None
    parallel_tool_calls: Any = Field(default=None, description="Accepted and ignored: meaningless without tools.")
    logit_bias: unsupported(EMPTY, "logit_bias") = None
    audio: unsupported(EMPTY, "audio output") = None
    modalities: unsupported(EMPTY | Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)],
                            "output modalities other than text") = None
    prediction: unsupported(EMPTY, "predicted outputs") = None
    web_search_options: unsupported(EMPTY, "web search") = None
    reasoning_effort: unsupported(EMPTY, "reasoning effort (this model does not reason)") = None
    suffix: unsupported(EMPTY, "suffix (fill-in-the-middle)") = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = Field(default=None, description="vLLM's older spelling of structured_outputs.json.")
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None

    def structured_output(self) -> StructuredOutput | None:
        """The request's output constraint, compiled (a 400 naming the keyword when it cannot be enforced)."""
        given: list[tuple[str, str, Any]] = []
        rf = self.response_format
        if isinstance(rf, JSONObjectFormat):
            given.append(("response_format", "json_object", None))
        elif isinstance(rf, JSONSchemaFormat):
            schema = rf.json_schema.schema_
            if schema is None:
                given.append(("response_format", "json_object", None))
            else:
                given.append(("response_format", "json_schema", closed(schema) if rf.json_schema.strict else schema))
        so = self.structured_outputs
        if so is not None:
            picked = [(k, v) for k, v in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                          ("grammar", so.grammar), ("json_object", so.json_object or None)) if v is not None]
            if len(picked) != 1:
                raise InvalidRequestError("structured_outputs takes exactly one of json, regex, choice, grammar or json_object",
                                          param="structured_outputs")
            given.append(("structured_outputs", *picked[0]))
        for field, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar")):
            if getattr(self, field) is not None:
                given.append((field, kind, getattr(self, field)))
        if not given:
            return None
        if len(given) > 1:
            raise InvalidRequestError(f"give one output constraint, not {len(given)} ({', '.join(g[0] for g in given)})",
                                      param=given[1][0])
        param, kind, value = given[0]
        return StructuredOutput(kind, value, param)  # type: ignore[arg-type]

    def unknown_fields(self) -> list[str]:
        known = {"store", "metadata", "service_tier", "stream_options"}
        return sorted(set(self.model_extra or {}) - known)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(description="A model served here (see /v1/models); another is a 404.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Stop | Annotated[list[Stop], Field(max_length=16)] | None = None
    seed: int | None = Field(default=None, description="Any integer; the sampler's generator takes it modulo 2**64.")
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extras (vLLM names), sent through `extra_body`
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    """vLLM's: keep generating past end-of-sequence tokens, up to max_tokens (benchmarks)."""
    speculative_tokens: int | None = Field(default=None, ge=0, le=16)
    """Prompt-lookup draft tokens verified per step for greedy requests (0 off; unset: the server's --speculative-tokens)."""
    cache_salt: str | None = Field(default=None, max_length=256)
    """vLLM's: prefix-cache reuse only between requests with the same salt (on top of the API key's own)."""

    rules = (Needs("stream_options", "stream", True, "stream_options is only allowed when stream is true"),)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else self.stop or ())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model produced them.")


class MessageToolCall(BaseModel):
    """A call an assistant message made (in the history of a conversation)."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class TurnMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, description="On an assistant message: the calls it made.")
    tool_call_id: None = None


class ToolMessage(BaseModel):
    """A tool's result, answering a call an assistant message made earlier in the conversation (else a 400)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str = Field(min_length=1)
    name: str | None = None
    tool_calls: None = None


def _role(value: Any) -> str:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    return "tool" if role == "tool" else "turn"


ChatMessage = Annotated[Annotated[TurnMessage, Tag("turn")] | Annotated[ToolMessage, Tag("tool")], Discriminator(_role)]


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON Schema of the arguments; absent: none.")
    strict: bool | None = Field(default=None, description="Accepted: every call's arguments are held to the schema anyway.")


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


def _refuse_tool_messages(data: Any) -> Any:
    """Refuse legacy function turns and non-text content parts with a message that says why (the schema leaves them out)."""
    messages = data.get("messages") if isinstance(data, dict) else None
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "function":
            raise InvalidRequestError(f"messages[{i}]: role 'function' is the deprecated function calling, which Lamina does not "
                                      "support; use tools, and 'tool' messages with a tool_call_id", param="messages")
        for part in m.get("content") if isinstance(m.get("content"), list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise InvalidRequestError(f"messages[{i}]: content part type '{kind}' is not supported; only 'text' parts",
                                          param="messages")
    return data


def chat_messages(messages: list[TurnMessage | ToolMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates want them: plain string content; `developer` is `system`; calls and their ids kept."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            msg["name"] = m.name
        out.append(msg)
    return out


_CONTEXT = "Prompt plus this must fit the model's context (max_model_len in /v1/models), else 400 context_length_exceeded."


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The model's chat template may refuse some conversations.")
    tools: list[ChatTool] | None = Field(default=None, description="At most 128, with unique names (else a 400).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required, or a function among the tools (else a 400).")
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call per answer.")
    # Lamina's grounded chat (through `extra_body`): retrieve from these vector stores and cite.
    vector_store_ids: list[str] | None = Field(default=None, max_length=8)
    max_num_results: int = Field(default=4, ge=1, le=20)
    max_tokens: int | None = Field(default=None, ge=1, description=_CONTEXT)
    max_completion_tokens: int | None = Field(default=None, ge=1, description=_CONTEXT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    rules = (*_Sampling.rules, Needs("top_logprobs", "logprobs", True, "top_logprobs requires logprobs to be true"))

    @model_validator(mode="before")
    @classmethod
    def _tool_messages(cls, data: Any) -> Any:
        return _refuse_tool_messages(data)

    def chat_messages(self) -> list[dict[str, Any]]:
        return chat_messages(self.messages)

    def openai_tools(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def openai_tool_choice(self) -> Any:
        return self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice


Prompt = (Annotated[str, Field(min_length=1)]
          | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
          | Annotated[list[TokenId], Field(min_length=1)]
          | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=1, description=_CONTEXT)  # OpenAI's default for the legacy endpoint
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N, description="Only equal to n (no best-of selection yet), else a 400.")

    rules = (
        *_Sampling.rules,
        Needs("logprobs", "echo", False, "echo with logprobs is not supported by Lamina yet (no prompt logprobs)", param="echo"),
    )

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        # One field equal to another is a rule JSON Schema cannot state: it is documented on the field.
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported by Lamina yet", param="best_of")
        return self


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    rules = (OneOf(("prompt", "messages"), "give exactly one of prompt or messages"),)

    @model_validator(mode="before")
    @classmethod
    def _tool_messages(cls, data: Any) -> Any:
        return _refuse_tool_messages(data)


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId] = Field(description="Token ids below the model's vocabulary size, else a 400.")


# --- responses and stream chunks ----------------------------------------------------------------------------


class PromptTokensDetails(WireModel):
    cached_tokens: int


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(WireModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(WireModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Citation(WireModel):
    """Lamina's addition to grounded chat: a passage the answer may cite as [index]."""

    index: int
    file_id: str
    filename: str
    page: int | None
    score: float
    snippet: str
    vector_store_id: str


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCallOut(WireModel):
    name: str
    arguments: str


class ToolCallOut(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatCompletionMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | MISSING = MISSING
    """Only when the model called tools."""


class DeltaFunction(WireModel):
    name: str | MISSING = MISSING
    arguments: str | MISSING = MISSING


class DeltaToolCall(WireModel):
    """A piece of a streamed call: id, type and name on an index's first piece, then argument fragments."""

    index: int
    id: str | MISSING = MISSING
    type: Literal["function"] | MISSING = MISSING
    function: DeltaFunction | MISSING = MISSING


class ChatChoice(WireModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    citations: list[Citation] | MISSING = MISSING
    """Only for grounded chat (`vector_store_ids`)."""


class ChatDelta(WireModel):
    """What a chunk adds to its choice; OpenAI sends only the keys that apply (role on the first chunk)."""

    role: Literal["assistant"] | MISSING = MISSING
    content: str | MISSING | None = MISSING
    refusal: str | MISSING | None = MISSING
    tool_calls: list[DeltaToolCall] | MISSING = MISSING


class ChatChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(WireModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    usage: Usage | MISSING | None = MISSING
    """With `stream_options.include_usage`: null on every chunk but the last, which has `choices: []`."""
    choices: list[ChatChunkChoice]
    citations: list[Citation] | MISSING = MISSING
    """Grounded chat: on each choice's last chunk, and on the usage chunk."""


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(WireModel):
    """A streamed piece of a completion (OpenAI reuses the `text_completion` object for it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    usage: Usage | MISSING | None = MISSING
    choices: list[CompletionChunkChoice]


class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamina"
    root: str | None
    parent: str | None
    max_model_len: int | None
    task: Literal["generate", "embed"]
    """Lamina's addition: what the model is for (the web chat offers only `generate` models)."""


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(WireModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(WireModel):
    prompt: str


class Health(WireModel):
    status: Literal["ok"] = "ok"
