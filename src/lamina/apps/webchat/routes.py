"""The web chat's routes: the page (public: it holds no data) and the conversation API (needs the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from lamina.api.deps import KeyDep, authenticate
from lamina.apps.webchat.store import ConversationStore

STATIC = Path(__file__).parent / "static"


class NewConversation(BaseModel):
    title: str = Field(default="New chat", max_length=200)
    settings: dict[str, Any] = Field(default_factory=dict)


class ConversationPatch(BaseModel):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    settings: dict[str, Any] | None = None


class StoredMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    meta: dict[str, Any] = Field(default_factory=dict)


class MessageList(BaseModel):
    messages: list[StoredMessage] = Field(max_length=10_000)


def _store(request: Request) -> ConversationStore:
    return request.app.state.conversations


StoreDep = Annotated[ConversationStore, Depends(_store)]
router = APIRouter(prefix="/api/conversations", tags=["web chat"], dependencies=[Depends(authenticate)])


def _owner(key: Any) -> int | None:
    return None if key is None else key.id


@router.get("")
def list_conversations(store: StoreDep, key: KeyDep) -> dict[str, Any]:
    return {"object": "list", "data": store.list(_owner(key))}


@router.post("")
def create_conversation(body: NewConversation, store: StoreDep, key: KeyDep) -> dict[str, Any]:
    return store.create(_owner(key), body.title, body.settings)


@router.get("/{conversation_id}")
def get_conversation(conversation_id: str, store: StoreDep, key: KeyDep) -> dict[str, Any]:
    return store.get(_owner(key), conversation_id)


@router.patch("/{conversation_id}")
def update_conversation(conversation_id: str, body: ConversationPatch, store: StoreDep, key: KeyDep) -> dict[str, Any]:
    return store.update(_owner(key), conversation_id, body.title, body.settings)


@router.put("/{conversation_id}/messages")
def replace_messages(conversation_id: str, body: MessageList, store: StoreDep, key: KeyDep) -> dict[str, Any]:
    return store.replace_messages(_owner(key), conversation_id, [m.model_dump() for m in body.messages])


@router.delete("/{conversation_id}")
def delete_conversation(conversation_id: str, store: StoreDep, key: KeyDep) -> dict[str, Any]:
    store.delete(_owner(key), conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def mount(app: FastAPI) -> None:
    app.state.conversations = ConversationStore(app.state.services.db)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})
