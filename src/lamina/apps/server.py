"""The full server: the OpenAI-compatible API (layer 5) with the web chat (layer 6) on top, and agents' tools in it.

This is the composition root for `lamina serve`: the API knows nothing of the web chat; the chat adds its
page and its conversation routes to the API's app; the agents application gives the chat its tools
(`AgentTools`, the chat's `ToolRunner`), so that neither application imports the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI

from lamina.api.app import ServeArgs, create_app
from lamina.apps.agents import Agent, AgentArgs, AgentRuns, Toolbox
from lamina.apps.agents.mcp import McpServerConfig, McpTools
from lamina.apps.agents.tools import builtin_tools, retriever_search
from lamina.apps.webchat import mount_webchat
from lamina.errors import LaminaError
from lamina.llm import LLM
from lamina.llm.rag import Retriever

logger = logging.getLogger(__name__)


class AgentTools:
    """The web chat's tools: the built-ins (file_search over the conversation's store), and the tools of the
    MCP servers `lamina serve --mcp-config` names, each server started for the runs that enable one of its tools."""

    def __init__(self, app: FastAPI, servers: Sequence[McpServerConfig], model: str | None) -> None:
        self.app, self.servers = app, list(servers)
        self.model = model
        """The served model (a tool-use adapter) the agent's turns ask for; None: the page's model."""
        self._listing: list[dict[str, Any]] | None = None
        self._runs: AgentRuns | None = None

    def _builtins(self, store: str | None) -> list[Any]:
        rag = self.app.state.services.rag
        search = None
        if store:
            retriever = Retriever(rag.stores, rag.ready())
            search = retriever_search(retriever, [store])
        return builtin_tools(search=search, stores=[store] if store else [])

    async def available(self, store: str | None) -> list[dict[str, Any]]:
        if self._listing is None:
            listing = []
            for server in self.servers:  # one by one: a server that does not start costs its own tools only
                try:
                    async with McpTools([server]) as mcp:
                        listing += [{"name": t.name, "description": t.description, "source": t.source} for t in mcp.tools]
                except LaminaError as e:
                    logger.warning("%s; its tools are not offered", e.message)
            self._listing = listing
        builtin = [{"name": t.name, "description": t.description, "source": t.source} for t in self._builtins(store)]
        return builtin + self._listing

    async def run(self, history: list[dict[str, Any]], task: str, enabled: list[str], store: str | None, turn: Any,
                  on_step: Callable[[str, dict[str, Any]], None], temperature: float, top_p: float) -> Any:
        llm: LLM = self.app.state.services.openai.ready()
        if self._runs is None:
            self._runs = AgentRuns(self.app.state.services.db)
        builtins = self._builtins(store)
        wanted = [s for s in self.servers if any(name.startswith(f"{s.name}_") for name in enabled)]
        async with McpTools(wanted) as mcp:
            box = Toolbox([*builtins, *mcp.tools]).only(enabled)
            args = AgentArgs(temperature=temperature, top_p=top_p)
            if history and history[0]["role"] == "system":  # the conversation's own system prompt joins the agent's
                args = AgentArgs(temperature=temperature, top_p=top_p, system=f"{args.system}\n\n{history[0]['content']}")
                history = history[1:]
            agent = Agent(llm, box, args, runs=self._runs, on_step=lambda run, step: on_step(step.kind, step.data), turn=turn)
            return await agent.arun(task, history)


def build_app(args: ServeArgs, load: Callable[[ServeArgs], LLM] | None = None, *,
              mcp_servers: Sequence[McpServerConfig] = (), tool_model: str | None = None) -> FastAPI:
    app = create_app(args, load)
    mount_webchat(app, AgentTools(app, mcp_servers, tool_model))
    return app
