"""Request and response models of the files, vector-store and embeddings routes, with OpenAI's field names:
the one source of their wire format (validation, /openapi.json, the bodies sent).

What depends on the loaded embedding model is documented on the field rather than published as a bound: a
static chunk must fit what the model reads (`max_chunk_size_tokens` at most its `max_model_len` in
/v1/models, less 2), and `dimensions` can only be the model's own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lamina.api.wire import EMPTY, NON_BLANK, WireModel, non_blank, unsupported
from lamina.errors import InvalidRequestError
from lamina.infra.files import PURPOSES

Purpose = Literal[PURPOSES]  # type: ignore[valid-type]
# Integers SQLite can hold; a larger one is read as a float (the JSON number it is), never refused.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Scalar = str | bool | Int64 | float
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)]


DEFAULT_OVERLAP = 40


class StaticChunking(BaseModel):
    max_chunk_size_tokens: int = Field(default=200, ge=16, le=4096,
                                       description="At most what the embedding model reads (its max_model_len less 2).")
    chunk_overlap_tokens: int | None = Field(default=None, ge=0, description=(
        f"At most half of max_chunk_size_tokens; when absent, {DEFAULT_OVERLAP} or half of a smaller chunk."))

    @model_validator(mode="after")
    def _overlap(self) -> StaticChunking:
        # Half the chunk at most is a rule between two fields that JSON Schema cannot state: documented above. The
        # default keeps to it, so that leaving the overlap out is never refused.
        if self.chunk_overlap_tokens is None:
            self.chunk_overlap_tokens = min(DEFAULT_OVERLAP, self.max_chunk_size_tokens // 2)
        elif self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise InvalidRequestError("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens", param="chunking_strategy")
        return self

    @property
    def overlap(self) -> int:
        assert self.chunk_overlap_tokens is not None  # set by the validator
        return self.chunk_overlap_tokens


class ChunkingStrategy(BaseModel):
    type: Literal["auto", "static"] = "auto"
    static: StaticChunking | None = None

    def sizes(self, encoder_max_tokens: int) -> tuple[int, int]:
        """(max tokens, overlap): `auto` fits the embedding model (OpenAI's 800/400 would not fit 256 tokens)."""
        if self.type == "static":
            static = self.static or StaticChunking()
            if static.max_chunk_size_tokens > encoder_max_tokens - 2:
                raise InvalidRequestError(
                    f"max_chunk_size_tokens {static.max_chunk_size_tokens} exceeds what the embedding model reads "
                    f"({encoder_max_tokens - 2} tokens)", param="chunking_strategy")
            return static.max_chunk_size_tokens, static.overlap
        size = min(200, encoder_max_tokens - 2)
        return size, size // 5


class VectorStoreCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = Field(default=None, max_length=256, description="Unique on this server (another store's is a 409).")
    file_ids: list[str] = Field(default_factory=list, max_length=500)
    metadata: Metadata | None = None
    chunking_strategy: ChunkingStrategy | None = None
    expires_after: unsupported(EMPTY, "expiry") = None


class VectorStoreUpdate(BaseModel):
    name: str | None = Field(default=None, max_length=256, description="Unique on this server (another store's is a 409).")
    metadata: Metadata | None = None


class VectorStoreFileCreate(BaseModel):
    file_id: str
    attributes: Annotated[dict[str, Scalar], Field(max_length=16)] | None = None
    chunking_strategy: ChunkingStrategy | None = None


# --- OpenAI's file-search filters: a comparison, a membership test, or `and`/`or` of filters -----------------


class ComparisonFilter(BaseModel):
    """`key` compared with `value`: an attribute of the file (or `filename`, `file_id`, `page`)."""

    type: Literal["eq", "ne", "gt", "gte", "lt", "lte"]
    key: str = Field(min_length=1)
    value: Scalar


class MembershipFilter(BaseModel):
    """`key` is (`in`) or is not (`nin`) one of `value`."""

    type: Literal["in", "nin"]
    key: str = Field(min_length=1)
    value: list[Scalar] = Field(min_length=1)


class CompoundFilter(BaseModel):
    type: Literal["and", "or"]
    filters: list[Filter] = Field(min_length=1)


Filter = Annotated[ComparisonFilter | MembershipFilter | CompoundFilter, Field(discriminator="type")]
CompoundFilter.model_rebuild()


class RankingOptions(BaseModel):
    ranker: Literal["auto", "default-2024-11-15", "hybrid", "vector", "bm25"] = "auto"
    score_threshold: float | None = Field(default=None, ge=0, le=1)

    @property
    def mode(self) -> Literal["hybrid", "vector", "bm25"]:
        return "hybrid" if self.ranker in ("auto", "default-2024-11-15") else self.ranker  # type: ignore[return-value]


Query = str | list[str]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    query: (Annotated[str, Field(pattern=NON_BLANK)]
            | Annotated[list[str], Field(min_length=1, json_schema_extra={"contains": {"type": "string", "pattern": NON_BLANK}})]) = Field(
        description="Text to search for: something besides white space (in one item at least, for a list).")
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: Filter | None = None
    ranking_options: RankingOptions = Field(default_factory=RankingOptions)
    rewrite_query: unsupported(Literal[False] | None, "query rewriting",
                               lambda _: "rewrite_query is not supported by Lamina yet; set it to false") = False

    @model_validator(mode="after")
    def _query(self) -> SearchRequest:
        if not non_blank(self.text):  # a list of blank items; the schema's `contains` says the same
            raise InvalidRequestError("the query is empty: give some text to search for", param="query")
        return self

    @property
    def text(self) -> str:
        return self.query if isinstance(self.query, str) else " ".join(self.query)

    def filter_spec(self) -> dict[str, Any] | None:
        """The filter as the plain structure the vector store compiles to SQL."""
        return None if self.filters is None else self.filters.model_dump()


def _token_input(data: Any) -> Any:
    """Refuse token-id input with a message that says why (the schema publishes strings only)."""
    items = data.get("input") if isinstance(data, dict) else None
    items = items if isinstance(items, list) else [items]
    if any(isinstance(i, int | list) and not isinstance(i, bool) for i in items):
        raise InvalidRequestError("token-id input is not supported by Lamina yet; send strings", param="input")
    return data


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    model: str = Field(description="The embedding model served here (see /v1/models); another is a 404.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Only the model's own (384 for all-minilm-l6-v2).")
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _inputs(cls, data: Any) -> Any:
        return _token_input(data)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- responses ----------------------------------------------------------------------------------------------


class FileObject(WireModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None


class FileList(WireModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(WireModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileCounts(WireModel):
    in_progress: int = 0
    completed: int
    failed: int
    cancelled: int = 0
    total: int


class VectorStoreObject(WireModel):
    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    usage_bytes: int
    file_counts: FileCounts
    status: Literal["completed"] = "completed"
    expires_after: None = None
    expires_at: None = None
    last_active_at: int
    metadata: dict[str, Any]


class VectorStoreList(WireModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreObject]
    first_id: str | None
    last_id: str | None
    has_more: bool = False


class VectorStoreDeleted(WireModel):
    id: str
    object: Literal["vector_store.deleted"] = "vector_store.deleted"
    deleted: bool = True


class LastError(WireModel):
    code: Literal["invalid_file"] = "invalid_file"
    message: str


class ChunkSizes(WireModel):
    max_chunk_size_tokens: int
    chunk_overlap_tokens: int


class StaticChunkingObject(WireModel):
    type: Literal["static"] = "static"
    static: ChunkSizes


class VectorStoreFileObject(WireModel):
    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    created_at: int
    vector_store_id: str
    status: Literal["completed", "failed"]
    usage_bytes: int
    last_error: LastError | None
    attributes: dict[str, Any]
    filename: str
    chunk_count: int
    chunking_strategy: StaticChunkingObject


class VectorStoreFileList(WireModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreFileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool = False


class VectorStoreFileDeleted(WireModel):
    id: str
    object: Literal["vector_store.file.deleted"] = "vector_store.file.deleted"
    deleted: bool = True


class TextContent(WireModel):
    type: Literal["text"] = "text"
    text: str


class SearchResult(WireModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, Any]
    content: list[TextContent]


class SearchResultsPage(WireModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: Query
    data: list[SearchResult]
    has_more: bool = False
    next_page: None = None


class Embedding(WireModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    """Floats, or with `encoding_format: base64` their little-endian float32 bytes in base64."""


class EmbeddingUsage(WireModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(WireModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

