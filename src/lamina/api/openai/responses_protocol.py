"""The wire format of OpenAI's Responses API (`POST /v1/responses` and its siblings), as the openai SDK reads it.

A request's `input` is a string or a list of items (messages, `function_call`s the model made, and the
`function_call_output`s that answer them); tools are flat (`{"type": "function", "name", ...}`) or the hosted
`file_search`; `text.format` is the structured output. The response's `output` is a list of items: a
`file_search_call`, a `message` with `output_text` parts (file citations as annotations), `function_call`s.
Streaming sends typed events, each with a `sequence_number`, ending with `response.completed`,
`response.incomplete` or `response.failed` (no `[DONE]`). See ../shared/reference/TOOLS.md, section 1.6.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from lamina.api.wire import EMPTY, WireModel, unsupported

# --- request ------------------------------------------------------------------------------------------------


class InputText(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1, description="The call_id of a function_call earlier in the conversation (else a 400).")
    output: str | list[InputText]


class FileSearchCallItem(BaseModel):
    """A hosted search from an earlier response, sent back as input: kept for the record, not shown to the model."""

    model_config = ConfigDict(extra="allow")
    type: Literal["file_search_call"]
    id: str | None = None


def _item_type(value: Any) -> str:
    """An item's type; a message may leave it out (`{"role": "user", "content": ...}`, as the SDKs send it)."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "message"  # an unknown type is refused, naming the types there are


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[FileSearchCallItem, Tag("file_search_call")],
    Discriminator(_item_type)]


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(default=True, description="Calls are held to the schema either way.")


class FileSearchTool(BaseModel):
    type: Literal["file_search"]
    vector_store_ids: list[str] = Field(min_length=1, max_length=8)
    max_num_results: int = Field(default=4, ge=1, le=50)


Tool = Annotated[FunctionTool | FileSearchTool, Field(discriminator="type")]


class NamedFunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class HostedToolChoice(BaseModel):
    type: Literal["file_search"]


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["json_schema"]
    name: str = Field(default="response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None


class ResponseCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="A user message, or items of which at least one is a message or function call/output (else a 400); "
                    "a function_call_output answers a function_call before it.")
    instructions: str | None = Field(default=None, description="A system message for this response only (not carried by previous_response_id).")
    tools: list[Tool] | None = Field(default=None, max_length=129)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | HostedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, description="Any integer; the sampler's generator takes it modulo 2**64.")
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    include: list[str] | None = Field(default=None, description="'file_search_call.results' adds the passages to the search item.")
    truncation: Literal["disabled"] | None = None
    reasoning: unsupported(EMPTY, "reasoning (this model does not reason)") = None
    background: unsupported(None | Literal[False], "background responses") = None
    conversation: unsupported(EMPTY, "conversations (use previous_response_id)") = None


# --- response -----------------------------------------------------------------------------------------------


class FileCitation(WireModel):
    type: Literal["file_citation"] = "file_citation"
    file_id: str
    filename: str
    index: int
    """Where in the text the citation marker stands."""


class OutputText(WireModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[FileCitation]
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(WireModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOut(WireModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class FileSearchResult(WireModel):
    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict[str, Any] = Field(default_factory=dict)


class FileSearchCallOut(WireModel):
    type: Literal["file_search_call"] = "file_search_call"
    id: str
    status: Literal["in_progress", "searching", "completed", "failed"]
    queries: list[str]
    results: list[FileSearchResult] | None


OutputItem = Annotated[OutputMessage | FunctionCallOut | FileSearchCallOut, Field(discriminator="type")]


class InputTokensDetails(WireModel):
    cached_tokens: int


class OutputTokensDetails(WireModel):
    reasoning_tokens: int = 0


class ResponseUsage(WireModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(WireModel):
    reason: Literal["max_output_tokens"]


class ResponseError(WireModel):
    code: str
    message: str


class Response(WireModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    max_output_tokens: int | None
    previous_response_id: str | None
    text: dict[str, Any]
    metadata: dict[str, str]
    store: bool
    truncation: Literal["disabled"] = "disabled"
    user: str | None = None


class ResponseDeleted(WireModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(WireModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseEvent(WireModel):
    """One streamed event: `type` says which (response.created, response.output_text.delta, ...), the other fields
    are those OpenAI gives that type."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int
