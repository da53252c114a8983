"""MCP: tools from Model Context Protocol servers for Lamina's agents, and Lamina's own tools as an MCP server.

Client. Servers are configured in the `mcpServers` JSON of Claude Desktop and LibreChat:

    {"mcpServers": {
        "notes": {"command": "python", "args": ["notes_server.py"], "env": {"NOTES": "/data"}},
        "web":   {"type": "streamable-http", "url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "..."}},
        "off":   {"command": "...", "disabled": true},
        "some":  {"command": "...", "tools": ["only_this_one"]}
    }}

A server with `command` runs over stdio (its environment is the SDK's safe default plus `env`); one with `url`
over Streamable HTTP. `disabled` and the `tools` allow-list (Cline's and LibreChat's keys) limit what is
enabled. Each tool is offered to the model as `<server>_<tool>` (llama.cpp's naming; names cut to 64 characters
of [a-zA-Z0-9_-]), with the server's input schema as its parameters; a result is its text content.

Server. `lamina_mcp_server(...)` is an `MCPServer` with Lamina's tools (search over the vector stores, ask
the model) that `lamina mcp serve` runs over stdio, for other agents and editors.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.apps.agents.tools import AgentTool, ToolError, ToolResult
from lamina.errors import InvalidRequestError

_NAME = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    tools: list[str] | None = None
    """The allow-list: only these of the server's tools are enabled (None: all)."""
    timeout: float = 60.0

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "streamable-http"


def load_mcp_config(path: str | Path) -> list[McpServerConfig]:
    """The enabled servers of an `mcpServers` JSON file; a bad file is an error that says what to fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidRequestError(f"cannot read the MCP config {path}: {e.strerror}", param="mcp_config") from None
    except ValueError as e:
        raise InvalidRequestError(f"the MCP config {path} is not JSON ({e})", param="mcp_config") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise InvalidRequestError(f'{path}: expected {{"mcpServers": {{"name": {{"command": ..., "args": [...]}}}}}}',
                                  param="mcp_config")
    out = []
    for name, spec in servers.items():
        where = f"{path}: server {name!r}"
        if not isinstance(spec, dict):
            raise InvalidRequestError(f"{where} must be an object", param="mcp_config")
        if spec.get("disabled"):
            continue
        if not _NAME.sub("", name) == name or not name:
            raise InvalidRequestError(f"{where}: a server name takes letters, digits, _ and - only", param="mcp_config")
        command, url = spec.get("command"), spec.get("url")
        if bool(command) == bool(url):
            raise InvalidRequestError(f"{where} needs either \"command\" (stdio) or \"url\" (streamable HTTP)", param="mcp_config")
        kind = spec.get("type") or spec.get("transport")
        if url and kind not in (None, "streamable-http", "http", "streamableHttp"):
            raise InvalidRequestError(f"{where}: transport {kind!r} is not supported; use streamable-http (SSE is deprecated)",
                                      param="mcp_config")
        for key, kind_of in (("args", list), ("env", dict), ("headers", dict)):
            if key in spec and not isinstance(spec[key], kind_of):
                raise InvalidRequestError(f"{where}: \"{key}\" must be a JSON {'array' if kind_of is list else 'object'}",
                                          param="mcp_config")
        tools = spec.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, str) for t in tools)):
            raise InvalidRequestError(f"{where}: \"tools\" must be a list of tool names", param="mcp_config")
        out.append(McpServerConfig(
            name=name, command=command, args=[str(a) for a in spec.get("args", [])],
            env={str(k): str(v) for k, v in spec.get("env", {}).items()}, cwd=spec.get("cwd"), url=url,
            headers={str(k): str(v) for k, v in spec.get("headers", {}).items()}, tools=tools,
            timeout=float(spec.get("timeout", 60.0)),
        ))
    return out


def tool_name(server: str, tool: str) -> str:
    return _NAME.sub("_", f"{server}_{tool}")[:64]


@dataclass(frozen=True)
class McpToolInfo:
    server: str
    name: str
    """The tool's own name on its server."""
    exposed: str
    """The name the model sees."""
    description: str
    input_schema: dict[str, Any]
    enabled: bool


class McpTools:
    """Connections to the configured servers (an async context manager): `tools` are AgentTools that call them.

    A server that cannot be reached fails the whole start with an error naming it (a silently missing tool is
    worse than none)."""

    def __init__(self, servers: Sequence[McpServerConfig]) -> None:
        self.servers = list(servers)
        self.listing: list[McpToolInfo] = []
        self._clients: dict[str, Any] = {}
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> McpTools:
        from mcp import Client, StdioServerParameters  # lazily: only agents with MCP servers need the SDK

        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            for server in self.servers:
                if server.command:
                    target: Any = StdioServerParameters(command=server.command, args=server.args, env=server.env or None,
                                                        cwd=server.cwd)
                else:
                    target = await _http_transport(server, self._stack)
                try:
                    client = await self._stack.enter_async_context(
                        Client(target, read_timeout_seconds=server.timeout))
                    listing = await client.list_tools()
                except Exception as e:  # the SDK raises many kinds (OSError, McpError, ExceptionGroup)
                    raise InvalidRequestError(f"MCP server {server.name!r} ({server.transport}) did not start: "
                                              f"{_reason(e)}", param="mcp_config") from None
                self._clients[server.name] = client
                for tool in listing.tools:
                    enabled = server.tools is None or tool.name in server.tools
                    self.listing.append(McpToolInfo(server.name, tool.name, tool_name(server.name, tool.name),
                                                    tool.description or "", dict(tool.input_schema or {}), enabled))
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            with contextlib.suppress(Exception):  # a server that dies on the way out has nothing left to give
                await stack.__aexit__(None, None, None)

    @property
    def tools(self) -> list[AgentTool]:
        return [self._tool(info) for info in self.listing if info.enabled]

    def _tool(self, info: McpToolInfo) -> AgentTool:
        async def run(arguments: dict[str, Any]) -> ToolResult:
            try:
                result = await self._clients[info.server].call_tool(info.name, arguments)
            except Exception as e:
                raise ToolError(f"error: MCP server {info.server!r} failed: {_reason(e)}") from None
            return ToolResult(_result_text(result), is_error=bool(getattr(result, "is_error", False)))

        schema = info.input_schema if info.input_schema.get("type") == "object" else {"type": "object", "properties": {}}
        return AgentTool(info.exposed, info.description, schema, run, source=info.server)


async def _http_transport(server: McpServerConfig, stack: AsyncExitStack) -> Any:
    """The Streamable HTTP transport (entered by the `Client`); with headers, on an HTTP client of our own."""
    from mcp.client.streamable_http import streamable_http_client

    if not server.headers:
        return streamable_http_client(server.url)  # type: ignore[arg-type]
    import httpx2  # the SDK's own HTTP client

    client = await stack.enter_async_context(httpx2.AsyncClient(headers=server.headers, timeout=server.timeout))
    return streamable_http_client(server.url, http_client=client)  # type: ignore[arg-type]


def _reason(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _result_text(result: Any) -> str:
    parts = []
    for block in getattr(result, "content", None) or []:
        text = getattr(block, "text", None)
        parts.append(text if text is not None else f"[{getattr(block, 'type', 'content')} omitted]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts) or "(no content)"


# --- Lamina as an MCP server ---------------------------------------------------------------------------

def lamina_mcp_server(search: Callable[[str, int], str] | None, ask: Callable[[str], str] | None,
                      stores: Sequence[str] = ()) -> Any:
    """An `MCPServer` named lamina: `search` (passages from the vector stores) when `search` is given, and
    `ask` (the model's answer, grounded in the stores when there are some) when `ask` is."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("lamina", instructions="Lamina's vector stores and its local language model.")
    where = f" ({', '.join(stores)})" if stores else ""
    if search is not None:
        @server.tool(name="search", description=f"Search Lamina's documents{where} for passages about a query.",
                     structured_output=False)
        def search_tool(query: str, k: int = 4) -> str:
            return search(query, max(1, min(int(k), 20)))

    if ask is not None:
        @server.tool(name="ask", description=f"Ask Lamina's local language model a question{where}.", structured_output=False)
        def ask_tool(question: str) -> str:
            return ask(question)

    return server
