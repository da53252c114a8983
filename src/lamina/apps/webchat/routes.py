"""The web chat's routes: the page (public: it holds no data) and the conversation API (needs the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from lamina.api.deps import KeyDep, authenticate
from lamina.apps.webchat.reply import Replies, ReplyRequest, ToolRunner
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
config_router = APIRouter(prefix="/api/chat/config", tags=["web chat"], dependencies=[Depends(authenticate)])


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


@router.post("/{conversation_id}/reply")
async def reply(conversation_id: str, body: ReplyRequest, request: Request, key: KeyDep) -> StreamingResponse:
    """The answer to the conversation's last message, streamed (Server-Sent Events); the conversation is saved."""
    replies: Replies = request.app.state.replies
    events = await replies.stream(request, key, _owner(key), conversation_id, body)
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})


@config_router.get("")
async def chat_config(request: Request, store: str | None = None) -> dict[str, Any]:
    """What the page starts from: the model, its sampling defaults, and the tools a conversation can enable."""
    replies: Replies = request.app.state.replies
    llm = replies.openai.llm
    tools = await replies.tools.available(store) if replies.tools is not None else []
    return {"model": replies.openai.model_name, "sampling": llm.sampling_defaults if llm is not None else {},
            "tools": tools, "tool_model": replies.tools.model if replies.tools is not None else None}


@router.delete("/{conversation_id}")
def delete_conversation(conversation_id: str, store: StoreDep, key: KeyDep) -> dict[str, Any]:
    store.delete(_owner(key), conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def mount(app: FastAPI, tools: ToolRunner | None = None) -> None:
    app.state.conversations = ConversationStore(app.state.services.db)
    app.state.replies = Replies(app.state.conversations, app.state.services.openai, tools)
    app.include_router(router)
    app.include_router(config_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})
