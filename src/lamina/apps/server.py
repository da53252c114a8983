"""The full server: the OpenAI-compatible API (layer 5) with the web chat (layer 6) on top.

This is the composition root for `lamina serve`: the API knows nothing of the web chat; the chat adds its
page and its conversation routes to the API's app.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from lamina.api.app import ServeArgs, create_app
from lamina.apps.webchat import mount_webchat
from lamina.llm import LLM


def build_app(args: ServeArgs, load: Callable[[ServeArgs], LLM] | None = None) -> FastAPI:
    app = create_app(args, load)
    mount_webchat(app)
    return app
