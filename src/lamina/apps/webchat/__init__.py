"""The web chat (layer 6): a page at `/` and conversation routes under `/api/conversations`."""

from __future__ import annotations

from fastapi import FastAPI


def mount_webchat(app: FastAPI) -> None:
    from lamina.apps.webchat.routes import mount

    mount(app)
