"""Applications (layer 6): the web chat, the RAG assistant, agents with tools (`from lamina.apps import Agent`)."""

from typing import Any

_AGENTS = {"Agent", "AgentArgs", "AgentRun", "AgentRuns", "Toolbox"}


def __getattr__(name: str) -> Any:  # lazily, so that importing one application does not load another
    if name in _AGENTS:
        from lamina.apps import agents

        return getattr(agents, name)
    raise AttributeError(f"module 'lamina.apps' has no attribute {name!r}")
