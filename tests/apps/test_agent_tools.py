"""The agent's tools and toolbox, without a model: the calculator's safety, the folder's walls, the toolbox's
refusals, the MCP config, and MCP servers over stdio and Streamable HTTP through the real `mcp` SDK."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamina.apps.agents import Folder, Toolbox, ToolError, calculate, calculator, current_datetime, file_tools
from lamina.apps.agents.mcp import McpTools, load_mcp_config, tool_name
from lamina.errors import InvalidRequestError


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- calculator ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "value"), [
    ("37 * 91", 3367), ("(3 + 4) * 12", 84), ("2 ^ 10", 1024), ("2 ** -1", 0.5), ("7 // 2", 3), ("7 % 4", 3),
    ("sqrt(144)", 12.0), ("factorial(5)", 120), ("max(3, 9, 4)", 9), ("-(-5)", 5), ("12 × 3 ÷ 4", 9.0), ("round(pi, 3)", 3.142),
])
def test_calculator_values(expr: str, value: float) -> None:
    assert calculate(expr) == pytest.approx(value)


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "().__class__", "open('/etc/passwd')", "lambda: 1", "[1, 2]", "'a' * 3",
    "x", "True + 1", "sqrt.__name__", "eval('1')", "1 if 1 else 2", "sqrt(x=4)", "a := 3",
])
def test_calculator_refuses_anything_but_arithmetic(expr: str) -> None:
    with pytest.raises(ToolError, match="error:"):
        calculate(expr)


@pytest.mark.parametrize("expr", ["9 ** 9 ** 9", "10 ** 100000", "factorial(100000)", "2 ** 4000 * 2 ** 4000",
                                  "comb(5000, 2500)", "1 / 0", "sqrt(-1)", "10.0 ** 400", "(" * 300 + "1" + ")" * 300,
                                  "1 + " * 400 + "1", ""])
def test_calculator_bounds_hold(expr: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ToolError):
        calculate(expr)
    assert time.perf_counter() - started < 5, "a bound let the work run on"


def test_calculator_tool_result_and_error() -> None:
    tool = calculator()
    assert run(tool.call({"expression": "6 * 7"})).text == "42"
    assert run(tool.call({"expression": "10 / 4"})).text == "2.5"
    assert run(tool.call({"expression": "17 / 100 * 2400"})).text == "408"
    assert run(tool.call({"expression": "1 / 3"})).text == "0.333333333333"
    bad = run(tool.call({"expression": "import os"}))
    assert bad.is_error and "not an arithmetic expression" in bad.text


def test_current_datetime_in_a_timezone() -> None:
    fixed = dt.datetime(2026, 12, 3, 14, 0, tzinfo=dt.UTC)
    tool = current_datetime(lambda: fixed)
    assert run(tool.call({})).text.startswith("2026-12-03T14:00:00+00:00 (Thursday 03 December 2026")
    assert run(tool.call({"timezone": "Asia/Tokyo"})).text.startswith("2026-12-03T23:00:00+09:00")
    bad = run(tool.call({"timezone": "Mars/Olympus"}))
    assert bad.is_error and "IANA" in bad.text


# --- files under one folder ----------------------------------------------------------------------------

def test_folder_reads_inside_and_nothing_outside(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("inside")
    (root / "sub" / "deep.md").write_text("deeper")
    (tmp_path / "secret.txt").write_text("outside")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "escape").symlink_to(tmp_path)
    (root / "blob.bin").write_bytes(b"\x00\x01" * 10)
    folder = Folder(root)
    read, listing = (run(t.call({"path": p})) for t, p in zip(file_tools(folder), ["notes.txt", "."], strict=True))
    assert read.text == "inside" and not read.is_error
    assert "notes.txt" in listing.text and "sub/" in listing.text
    assert "link.txt" not in listing.text and "escape" not in listing.text  # they point outside
    assert folder.read("sub/deep.md") == "deeper"
    for path in ["../secret.txt", "link.txt", "escape/secret.txt", "sub/../../secret.txt", str(tmp_path / "secret.txt"),
                 "/etc/passwd"]:
        with pytest.raises(ToolError):
            folder.read(path)
    with pytest.raises(ToolError, match="not a text file"):
        folder.read("blob.bin")
    with pytest.raises(ToolError):
        folder.list("..")


def test_folder_cuts_big_files_and_needs_a_folder(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("x" * 100_000)
    text = Folder(tmp_path, max_bytes=1000).read("big.txt")
    assert text.startswith("x" * 1000) and "cut at 1000 bytes" in text
    with pytest.raises(InvalidRequestError, match="not a folder"):
        Folder(tmp_path / "missing")


# --- the toolbox ---------------------------------------------------------------------------------------

def test_toolbox_never_runs_a_tool_it_does_not_hold() -> None:
    ran: list[str] = []
    from lamina.apps.agents import AgentTool

    danger = AgentTool("delete_all_files", "Delete every file", {"type": "object", "properties": {}},
                       lambda args: ran.append("danger") or "deleted")
    box = Toolbox([calculator()])
    result = run(box.call("delete_all_files", "{}"))
    assert result.is_error and "not an enabled tool" in result.text and "calculator" in result.text
    assert ran == [] and danger.name not in box
    assert run(box.call("calculator", "not json")).is_error
    assert run(box.call("calculator", "[1]")).text == "error: the arguments must be a JSON object"
    assert "missing argument" in run(box.call("calculator", "{}")).text
    assert run(box.call("calculator", '{"expression": "1+1"}')).text == "2"


def test_toolbox_names_are_unique_and_only_narrows() -> None:
    with pytest.raises(InvalidRequestError, match="two tools are named 'calculator'"):
        Toolbox([calculator(), calculator()])
    box = Toolbox([calculator(), current_datetime()])
    assert box.only(["calculator"]).names == ["calculator"]
    with pytest.raises(InvalidRequestError, match="no tool named 'nope'"):
        box.only(["nope"])


# --- MCP -----------------------------------------------------------------------------------------------

SERVER = '''
import sys
from pathlib import Path
from mcp.server.mcpserver import MCPServer

server = MCPServer("notes")
MARK = Path(sys.argv[1])

@server.tool(description="The secret code of a word")
def get_code(word: str) -> str:
    return f"The code of {word} is {word.upper()[::-1]}-7."

@server.tool(description="Delete every file")
def delete_all_files() -> str:
    MARK.write_text("called")
    return "deleted"

if len(sys.argv) > 2:
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
else:
    server.run("stdio")
'''


def write_config(tmp_path: Path, servers: dict) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def test_mcp_config_errors_say_what_to_fix(tmp_path: Path) -> None:
    cases = {
        "{": "not JSON", '{"servers": {}}': "mcpServers",
        '{"mcpServers": {"a": {}}}': "needs either", '{"mcpServers": {"a": {"command": "x", "url": "http://h"}}}': "needs either",
        '{"mcpServers": {"a b": {"command": "x"}}}': "letters, digits", '{"mcpServers": {"a": {"command": "x", "args": "y"}}}': "array",
        '{"mcpServers": {"a": {"url": "http://h", "type": "sse"}}}': "not supported",
        '{"mcpServers": {"a": {"command": "x", "tools": "t"}}}': "list of tool names",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(InvalidRequestError, match=message):
            load_mcp_config(path)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_mcp_config(tmp_path / "missing.json")
    ok = write_config(tmp_path, {"a": {"command": "x", "args": [1], "env": {"K": 2}}, "b": {"command": "y", "disabled": True},
                                 "c": {"url": "http://h/mcp", "headers": {"Authorization": "Bearer t"}}})
    servers = load_mcp_config(ok)
    assert [(s.name, s.transport) for s in servers] == [("a", "stdio"), ("c", "streamable-http")]
    assert servers[0].args == ["1"] and servers[0].env == {"K": "2"}
    assert tool_name("my.server", "get code!") == "my_server_get_code_"


def test_mcp_stdio_tools_allow_list_and_calls(tmp_path: Path) -> None:
    script, mark = tmp_path / "server.py", tmp_path / "marker"
    script.write_text(SERVER)
    config = write_config(tmp_path, {"notes": {"command": sys.executable, "args": [str(script), str(mark)], "tools": ["get_code"]}})

    async def go() -> tuple:
        async with McpTools(load_mcp_config(config)) as mcp:
            box = Toolbox(mcp.tools)
            listing = {t.exposed: t.enabled for t in mcp.listing}
            result = await box.call("notes_get_code", '{"word": "lamina"}')
            refused = await box.call("notes_delete_all_files", "{}")
            return listing, box.names, result, refused

    listing, names, result, refused = run(go())
    assert listing == {"notes_get_code": True, "notes_delete_all_files": False}
    assert names == ["notes_get_code"]
    assert result.text == "The code of lamina is ANIMAL-7." and not result.is_error
    assert refused.is_error and not mark.exists(), "a tool left out of the allow-list ran"


def test_mcp_streamable_http_with_headers(tmp_path: Path) -> None:
    script, mark = tmp_path / "server.py", tmp_path / "marker"
    script.write_text(SERVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(script), str(mark), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        config = write_config(tmp_path, {"web": {"type": "streamable-http", "url": f"http://127.0.0.1:{port}/mcp",
                                                 "headers": {"X-Lamina-Test": "1"}}})

        async def go() -> str:
            async with McpTools(load_mcp_config(config)) as mcp:
                return (await Toolbox(mcp.tools).call("web_get_code", '{"word": "abc"}')).text

        assert run(go()) == "The code of abc is CBA-7."
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mcp_server_that_does_not_start_is_named(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"broken": {"command": sys.executable, "args": ["-c", "import sys; sys.exit(3)"]}})

    async def go() -> None:
        async with McpTools(load_mcp_config(config)):
            pass

    with pytest.raises(InvalidRequestError, match="MCP server 'broken' \\(stdio\\) did not start"):
        run(go())


def test_cli_mcp_list(tmp_path: Path) -> None:
    script, mark = tmp_path / "server.py", tmp_path / "marker"
    script.write_text(SERVER)
    config = write_config(tmp_path, {"notes": {"command": sys.executable, "args": [str(script), str(mark)], "tools": ["get_code"]}})
    out = subprocess.run([sys.executable, "-m", "lamina", "mcp", "list", "--mcp-config", str(config)], capture_output=True,
                         text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "notes (stdio): 2 tool(s)" in out.stdout
    assert "notes_get_code" in out.stdout and 'notes_delete_all_files' in out.stdout and "not enabled" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lamina", "mcp", "list", "--mcp-config", str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot read the MCP config")


# --- the loop, with scripted turns (the `turn` hook the web chat uses) ---------------------------------

def test_agent_loop_runs_calls_stops_on_repeats_and_records(tmp_path: Path) -> None:
    from lamina.apps.agents import Agent, AgentArgs, AgentRuns
    from lamina.apps.agents.agent import Turn
    from lamina.infra.db import open_database
    from lamina.llm.text.tools import ToolCall

    said: list[list[dict]] = []

    async def repeating(messages, tools, choice, params):  # type: ignore[no-untyped-def]
        said.append([dict(m) for m in messages])
        return Turn("", [ToolCall("calculator", '{"expression": "6*7"}')], 10, 5, "tool_calls")

    runs = AgentRuns(open_database(tmp_path / "lamina.db"))
    run = Agent(None, Toolbox([calculator()]), AgentArgs(max_steps=5), runs=runs, turn=repeating).run("six times seven")  # type: ignore[arg-type]
    assert run.status == "repeated_calls" and run.calls() == ["calculator"]  # run once, not five times
    assert said[1][-1] == {"role": "tool", "tool_call_id": said[1][-2]["tool_calls"][0]["id"], "content": "42"}
    assert run.completion_tokens == 10 and [s.kind for s in runs.get(run.id).steps] == ["model", "tool", "model", "stopped"]

    async def answering(messages, tools, choice, params):  # type: ignore[no-untyped-def]
        if messages[-1]["role"] == "tool":
            return Turn("It is 42.", [], 20, 4, "stop")
        assert choice == "required" and [t["function"]["name"] for t in tools] == ["calculator"]
        return Turn("", [ToolCall("calculator", '{"expression": "6*7"}'), ToolCall("rm_rf", "{}")], 10, 6, "tool_calls")

    run = Agent(None, Toolbox([calculator()]), AgentArgs(tool_choice="required"), turn=answering).run("six times seven")  # type: ignore[arg-type]
    assert run.status == "answered" and run.answer == "It is 42." and run.prompt_tokens == 30
    refused = [s.data for s in run.steps if s.kind == "tool" and s.data["name"] == "rm_rf"]
    assert refused and refused[0]["is_error"] and not refused[0]["enabled"]
