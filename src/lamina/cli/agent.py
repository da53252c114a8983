"""`lamina agent` (a tool loop on the local model) and `lamina mcp list|serve` (MCP servers' tools; Lamina's own
tools over MCP)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import click

from lamina.cli.common import fail_cleanly, load_llm, model_options
from lamina.settings import get_settings


def _database() -> Any:
    from lamina.infra.db import open_database

    return open_database(get_settings().database_for(get_settings().home))


def _retriever() -> Any:
    from lamina.cli.rag import _rag_parts
    from lamina.llm.rag import Retriever

    return Retriever(*_rag_parts())


def _mcp_servers(path: str | None) -> list[Any]:
    from lamina.apps.agents.mcp import load_mcp_config

    return load_mcp_config(path) if path else []


@click.command()
@click.argument("task", required=False)
@click.option("--store", "stores", multiple=True, help="vector store file_search searches (repeatable)")
@click.option("--allow-dir", type=click.Path(file_okay=False), default=None,
              help="the one folder read_file and list_files may read")
@click.option("--mcp-config", type=click.Path(dir_okay=False), default=None,
              help='MCP servers, as {"mcpServers": {"name": {"command": ..., "args": [...]}}}')
@click.option("--tool", "only", multiple=True,
              help="enable only these tools (repeatable; `lamina mcp list` names MCP tools); default: all configured")
@click.option("--max-steps", type=int, default=6, show_default=True, help="model turns at most")
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="tokens generated at most, all turns together")
@click.option("--tool-choice", type=click.Choice(["auto", "required"]), default="auto", show_default=True,
              help="required: the first turn must call a tool")
@click.option("--adapter", default="auto", show_default=True,
              help="tool-use LoRA adapter: auto (the one shipped for the model, if any), none, or a folder")
@click.option("--no-grammar", is_flag=True, help="do not constrain calls to the tools' schemas (to measure the grammar)")
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the run as JSON instead of the steps")
@click.option("--list", "list_runs", is_flag=True, help="list recent runs and stop")
@click.option("--show", "show_run", default=None, metavar="RUN_ID", help="show a recorded run and stop")
@model_options
@fail_cleanly
def agent(task: str | None, stores: tuple[str, ...], allow_dir: str | None, mcp_config: str | None, only: tuple[str, ...],
          max_steps: int, max_tokens: int, tool_choice: str, adapter: str, no_grammar: bool, temperature: float,
          as_json: bool, list_runs: bool, show_run: str | None, model: str | None, device: str | None, dtype: str | None) -> None:
    """Do TASK with tools: calculator and current_datetime, file_search over --store, files under --allow-dir,
    and the tools of MCP servers. Every step is shown and recorded (`--list`, `--show RUN_ID`)."""
    from lamina.apps.agents import Agent, AgentArgs, AgentRuns, Folder, Toolbox
    from lamina.apps.agents.adapters import use_tool_adapter
    from lamina.apps.agents.mcp import McpTools
    from lamina.apps.agents.tools import builtin_tools, retriever_search
    from lamina.errors import InvalidRequestError

    runs = AgentRuns(_database())
    if list_runs or show_run:
        _print_runs(runs, show_run, as_json)
        return
    if not task:
        raise InvalidRequestError('give the task: lamina agent "What is 37 * 91?" (or --list, --show RUN_ID)', param="task")
    servers = _mcp_servers(mcp_config)
    search = retriever_search(_retriever(), stores) if stores else None
    folder = Folder(allow_dir) if allow_dir else None
    loaded: list[Any] = []
    checked = AgentArgs(max_steps=max_steps, max_tokens=max_tokens, tool_choice=tool_choice,  # type: ignore[arg-type]
                        grammar=not no_grammar, temperature=temperature)

    async def go() -> Any:
        async with McpTools(servers) as mcp:  # the tools first: a bad --tool is an error before the model loads
            box = Toolbox([*builtin_tools(search=search, stores=stores, folder=folder), *mcp.tools])
            box = box.only(list(only)) if only else box
            llm = load_llm(model, device, dtype)
            loaded.append(llm)
            args = dataclasses.replace(checked, adapter=use_tool_adapter(llm, adapter))
            shown = None if as_json else _StepPrinter(box)
            return await Agent(llm, box, args, runs=runs, on_step=shown).arun(task)

    try:
        run = asyncio.run(go())
    finally:
        for llm in loaded:
            llm.close()
    if as_json:
        click.echo(json.dumps(_run_dict(run), indent=2, ensure_ascii=False))
    else:
        click.echo(f"\n{run.status}, {run.completion_tokens} tokens generated; recorded as {run.id} "
                   f"(lamina agent --show {run.id})", err=True)


class _StepPrinter:
    """Each step on the terminal as it happens (rich): calls, results, the answer."""

    def __init__(self, box: Any) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False, soft_wrap=True)
        self.console.print(f"[dim]tools: {', '.join(box.names) or '(none)'}[/dim]")

    def __call__(self, run: Any, step: Any) -> None:
        from rich.markup import escape

        d = step.data
        if step.kind == "model" and d["tool_calls"]:
            for call in d["tool_calls"]:
                self.console.print(f"[cyan]→ {escape(call['name'])}[/cyan]({escape(call['arguments'])})")
        elif step.kind == "tool":
            style = "red" if d["is_error"] else "green"
            text = d["result"] if len(d["result"]) < 400 else d["result"][:400] + " …"
            self.console.print(f"[{style}]← {escape(text)}[/{style}]")
        elif step.kind == "answer":
            self.out.print(d["content"])
        elif step.kind == "stopped":
            if d.get("content"):
                self.out.print(d["content"])
            self.console.print(f"[yellow]stopped: {d['reason']}[/yellow]")


def _run_dict(run: Any) -> dict[str, Any]:
    return {"id": run.id, "task": run.task, "tools": run.tools, "status": run.status, "answer": run.answer,
            "prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens, "started_at": run.started_at,
            "finished_at": run.finished_at, "steps": [{"kind": s.kind, "at": s.at, **s.data} for s in run.steps]}


def _print_runs(runs: Any, run_id: str | None, as_json: bool) -> None:
    if run_id is None:
        listed = runs.list()
        if as_json:
            click.echo(json.dumps([_run_dict(r) for r in listed], indent=2, ensure_ascii=False))
        for r in [] if as_json else listed:
            click.echo(f"{r.id}  {r.status:12} {r.completion_tokens:5} tok  {r.task[:70]}")
        return
    run = runs.get(run_id)
    if as_json:
        click.echo(json.dumps(_run_dict(run), indent=2, ensure_ascii=False))
        return
    click.echo(f"{run.id}: {run.task}\nstatus {run.status}; tools {', '.join(run.tools)}")
    for s in run.steps:
        if s.kind == "model":
            calls = ", ".join(f"{c['name']}({c['arguments']})" for c in s.data["tool_calls"])
            click.echo(f"  model  {calls or s.data['content'][:200]}")
        elif s.kind == "tool":
            click.echo(f"  tool   {s.data['name']} -> {s.data['result'][:200]}")
        else:
            click.echo(f"  {s.kind:6} {s.data.get('content') or s.data.get('reason', '')}")


@click.group("mcp")
def mcp_group() -> None:
    """Model Context Protocol: the tools of configured servers, and Lamina's own tools as a server."""


@mcp_group.command("list")
@click.option("--mcp-config", type=click.Path(dir_okay=False), required=True, help="the mcpServers JSON file")
@fail_cleanly
def mcp_list(mcp_config: str) -> None:
    """Start each configured server and show its tools (and the names the model sees)."""
    from lamina.apps.agents.mcp import McpTools

    servers = _mcp_servers(mcp_config)

    async def go() -> list[Any]:
        async with McpTools(servers) as mcp:
            return mcp.listing

    listing = asyncio.run(go())
    for server in servers:
        tools = [t for t in listing if t.server == server.name]
        click.echo(f"{server.name} ({server.transport}): {len(tools)} tool(s)")
        for t in tools:
            mark = "" if t.enabled else "  [not enabled: not in \"tools\"]"
            click.echo(f"  {t.exposed:32} {t.description[:70]}{mark}")


@mcp_group.command("serve")
@click.option("--store", "stores", multiple=True, help="vector store the search tool searches (repeatable)")
@click.option("--no-model", is_flag=True, help="offer only search (no ask tool, no model loaded)")
@model_options
@fail_cleanly
def mcp_serve(stores: tuple[str, ...], no_model: bool, model: str | None, device: str | None, dtype: str | None) -> None:
    """Serve Lamina's tools over MCP (stdio): search over the stores, and ask the local model."""
    from lamina.apps.agents.mcp import lamina_mcp_server
    from lamina.apps.agents.tools import retriever_search
    from lamina.errors import InvalidRequestError
    from lamina.llm import SamplingParams
    from lamina.llm.rag import citations, ground

    if no_model and not stores:
        raise InvalidRequestError("nothing to serve: give --store, or drop --no-model", param="store")
    retriever = _retriever() if stores else None
    passages = retriever_search(retriever, stores) if retriever is not None else None

    def search(query: str, k: int) -> str:
        assert passages is not None
        found = passages(query, k)
        return "\n\n".join(f"[{i}] ({p.filename}) {p.text}" for i, p in enumerate(found, start=1)) or "no passages found"

    llm = None if no_model else load_llm(model, device, dtype)

    def ask(question: str) -> str:
        assert llm is not None
        messages = [{"role": "user", "content": question}]
        if retriever is not None:
            messages = ground(messages, citations(retriever.search(list(stores), question, k=4)))
        return llm.chat(messages, SamplingParams(temperature=0, max_tokens=256)).text

    server = lamina_mcp_server(search if passages else None, ask if llm else None, stores)
    try:
        server.run("stdio")
    finally:
        if llm is not None:
            llm.close()
