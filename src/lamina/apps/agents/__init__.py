"""Agents (layer 6): a tool loop on Lamina's tool calling, built-in tools, and MCP as client and server.

    agent.py   Agent, AgentArgs, AgentRun and AgentRuns (the record of runs in the database)
    tools.py   AgentTool, Toolbox (the enabled tools; nothing else ever runs) and the built-in tools
    mcp.py     tools from MCP servers (`mcpServers` JSON), and Lamina's own tools as an MCP server
"""

from lamina.apps.agents.agent import Agent, AgentArgs, AgentRun, AgentRuns, Step
from lamina.apps.agents.tools import (
    AgentTool,
    Folder,
    Passage,
    Toolbox,
    ToolError,
    ToolResult,
    calculate,
    calculator,
    current_datetime,
    file_search,
    file_tools,
)

__all__ = ["Agent", "AgentArgs", "AgentRun", "AgentRuns", "AgentTool", "Folder", "Passage", "Step", "ToolError",
           "ToolResult", "Toolbox", "calculate", "calculator", "current_datetime", "file_search", "file_tools"]
