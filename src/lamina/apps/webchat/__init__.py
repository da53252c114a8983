"""The web chat (layer 6): a page at `/` and conversation routes under `/api/conversations`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def mount_webchat(app: FastAPI, tools: Any = None) -> None:
    """The page and its routes on `app`; `tools` (a `reply.ToolRunner`) lets conversations enable tools."""
    from lamina.apps.webchat.routes import mount

    mount(app, tools)
