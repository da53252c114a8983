"""Routes for files, vector stores, search and embeddings (OpenAI's paths); thin, over `RagService`.

Handlers that ingest or embed are plain `def`s: FastAPI runs them in its thread pool, so the event loop
keeps serving streams while documents are embedded. Each returns a response model of
`lamina.api.rag.protocol`, which is also what /openapi.json publishes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from lamina.api.deps import KeyDep, authenticate
from lamina.api.errors import ERRORS
from lamina.api.rag.protocol import (
    EmbeddingList,
    EmbeddingRequest,
    FileDeleted,
    FileList,
    FileObject,
    Purpose,
    SearchRequest,
    SearchResultsPage,
    VectorStoreCreate,
    VectorStoreDeleted,
    VectorStoreFileCreate,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreFileObject,
    VectorStoreList,
    VectorStoreObject,
    VectorStoreUpdate,
)
from lamina.api.rag.service import RagService


def _rag(request: Request) -> RagService:
    return request.app.state.services.rag


RagDep = Annotated[RagService, Depends(_rag)]
router = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


@router.post("/v1/files", tags=["files"])
def upload_file(rag: RagDep, file: Annotated[UploadFile, File()], purpose: Annotated[Purpose, Form()] = "assistants") -> FileObject:
    return rag.upload(file.filename, file.file.read(), purpose)


@router.get("/v1/files", tags=["files"])
def list_files(rag: RagDep, purpose: str | None = None) -> FileList:
    return rag.list_files(purpose)


@router.get("/v1/files/{file_id}", tags=["files"])
def retrieve_file(file_id: str, rag: RagDep) -> FileObject:
    return rag.get_file(file_id)


@router.get("/v1/files/{file_id}/content", tags=["files"], response_class=Response,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The file's bytes."}})
def file_content(file_id: str, rag: RagDep) -> Response:
    return Response(rag.file_content(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", tags=["files"])
def delete_file(file_id: str, rag: RagDep) -> FileDeleted:
    return rag.delete_file(file_id)


@router.post("/v1/vector_stores", tags=["vector stores"])
def create_vector_store(body: VectorStoreCreate, rag: RagDep) -> VectorStoreObject:
    return rag.create_store(body)


@router.get("/v1/vector_stores", tags=["vector stores"])
def list_vector_stores(rag: RagDep) -> VectorStoreList:
    return rag.list_stores()


@router.get("/v1/vector_stores/{store_id}", tags=["vector stores"])
def retrieve_vector_store(store_id: str, rag: RagDep) -> VectorStoreObject:
    return rag.get_store(store_id)


@router.post("/v1/vector_stores/{store_id}", tags=["vector stores"])
def update_vector_store(store_id: str, body: VectorStoreUpdate, rag: RagDep) -> VectorStoreObject:
    return rag.update_store(store_id, body)


@router.delete("/v1/vector_stores/{store_id}", tags=["vector stores"])
def delete_vector_store(store_id: str, rag: RagDep) -> VectorStoreDeleted:
    return rag.delete_store(store_id)


@router.post("/v1/vector_stores/{store_id}/files", tags=["vector stores"])
def create_vector_store_file(store_id: str, body: VectorStoreFileCreate, rag: RagDep) -> VectorStoreFileObject:
    return rag.add_file(store_id, body)


@router.get("/v1/vector_stores/{store_id}/files", tags=["vector stores"])
def list_vector_store_files(store_id: str, rag: RagDep) -> VectorStoreFileList:
    return rag.list_store_files(store_id)


@router.get("/v1/vector_stores/{store_id}/files/{file_id}", tags=["vector stores"])
def retrieve_vector_store_file(store_id: str, file_id: str, rag: RagDep) -> VectorStoreFileObject:
    return rag.get_store_file(store_id, file_id)


@router.delete("/v1/vector_stores/{store_id}/files/{file_id}", tags=["vector stores"])
def delete_vector_store_file(store_id: str, file_id: str, rag: RagDep) -> VectorStoreFileDeleted:
    return rag.remove_store_file(store_id, file_id)


@router.post("/v1/vector_stores/{store_id}/search", tags=["vector stores"])
def search_vector_store(store_id: str, body: SearchRequest, rag: RagDep) -> SearchResultsPage:
    return rag.search(store_id, body)


@router.post("/v1/embeddings", tags=["openai"])
def create_embeddings(body: EmbeddingRequest, rag: RagDep, key: KeyDep) -> EmbeddingList:
    return rag.embeddings(body, key)
