"""Request models of the files, vector-store and embeddings routes, with OpenAI's field names."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lamina.errors import InvalidRequestError

AttributeValue = str | int | float | bool


class StaticChunking(BaseModel):
    max_chunk_size_tokens: int = Field(default=200, ge=16, le=4096)
    chunk_overlap_tokens: int = Field(default=40, ge=0)

    @model_validator(mode="after")
    def _overlap(self) -> StaticChunking:
        if self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise InvalidRequestError("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens", param="chunking_strategy")
        return self


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
            return static.max_chunk_size_tokens, static.chunk_overlap_tokens
        size = min(200, encoder_max_tokens - 2)
        return size, size // 5


class VectorStoreCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = Field(default=None, max_length=256)
    file_ids: list[str] = Field(default_factory=list, max_length=500)
    metadata: dict[str, str] | None = None
    chunking_strategy: ChunkingStrategy | None = None
    expires_after: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse(self) -> VectorStoreCreate:
        if self.expires_after:
            raise InvalidRequestError("expires_after is not supported by Lamina yet; remove the field", param="expires_after")
        _check_metadata(self.metadata)
        return self


class VectorStoreUpdate(BaseModel):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _meta(self) -> VectorStoreUpdate:
        _check_metadata(self.metadata)
        return self


class VectorStoreFileCreate(BaseModel):
    file_id: str
    attributes: dict[str, AttributeValue] | None = None
    chunking_strategy: ChunkingStrategy | None = None

    @model_validator(mode="after")
    def _attributes(self) -> VectorStoreFileCreate:
        if self.attributes and len(self.attributes) > 16:
            raise InvalidRequestError("at most 16 attributes per file", param="attributes")
        return self


class RankingOptions(BaseModel):
    ranker: Literal["auto", "default-2024-11-15", "hybrid", "vector", "bm25"] = "auto"
    score_threshold: float | None = Field(default=None, ge=0, le=1)

    @property
    def mode(self) -> Literal["hybrid", "vector", "bm25"]:
        return "hybrid" if self.ranker in ("auto", "default-2024-11-15") else self.ranker  # type: ignore[return-value]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    query: str | list[str]
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: dict[str, Any] | None = None
    ranking_options: RankingOptions = Field(default_factory=RankingOptions)
    rewrite_query: bool = False

    @model_validator(mode="after")
    def _query(self) -> SearchRequest:
        text = self.query if isinstance(self.query, str) else " ".join(self.query)
        if not text.strip():
            raise InvalidRequestError("the query is empty: give some text to search for", param="query")
        if self.rewrite_query:
            raise InvalidRequestError("rewrite_query is not supported by Lamina yet; set it to false", param="rewrite_query")
        return self

    @property
    def text(self) -> str:
        return self.query if isinstance(self.query, str) else " ".join(self.query)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _inputs(self) -> EmbeddingRequest:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items:
            raise InvalidRequestError("input is empty: give a string or a list of strings", param="input")
        if not all(isinstance(i, str) for i in items):
            raise InvalidRequestError("token-id input is not supported by Lamina yet; send strings", param="input")
        if len(items) > 2048:
            raise InvalidRequestError(f"at most 2048 inputs per request (got {len(items)})", param="input")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise InvalidRequestError("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters", param="metadata")
