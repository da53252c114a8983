"""The tools an agent can use, and the toolbox that decides which ones it may.

A tool is a name, a description, a JSON Schema for its arguments and an async `call(arguments) -> ToolResult`.
The built-in ones:

    calculator        arithmetic and math functions, parsed with `ast` and evaluated node by node (never `eval`),
                      with bounds on exponents, factorials and the size of numbers, so no input can hang it
    current_datetime  the date and time now, in a timezone from the IANA database
    file_search       passages from the vector stores the user named (hybrid search, as `lamina ask`)
    read_file         a text file under the one folder the user allowed (and list_files to see what is there):
                      paths are resolved, symlinks followed, and anything that lands outside the folder refused

Code execution is left out: a sandbox that really holds (no network, no file outside its folder, memory and
time limits) needs namespaces or seccomp that not every machine Lamina runs on grants, and a subprocess with
rlimits alone can still read the user's files and reach the network.

`Toolbox` holds the enabled tools. It is the only way the agent runs a tool: a call that names anything else,
whatever the model was told by a prompt or a retrieved document, is answered with an error and never run.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lamina.errors import InvalidRequestError

MAX_RESULT_CHARS = 4000
"""What one tool result may add to the conversation (a small model's context is short)."""


@dataclass(frozen=True)
class ToolResult:
    text: str
    is_error: bool = False


class ToolError(Exception):
    """A tool could not do what it was asked; the message goes back to the model as the result."""


@dataclass
class AgentTool:
    """A tool: `run(arguments)` returns the text the model reads (sync or async); ToolError is a failed call."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    run: Callable[[dict[str, Any]], Any]
    source: str = "builtin"
    """Where it comes from: builtin, or the name of the MCP server that offers it."""

    def spec(self) -> dict[str, Any]:
        """As OpenAI's function tool."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        try:
            out = self.run(arguments)
            if isinstance(out, Awaitable):
                out = await out
        except ToolError as e:
            return ToolResult(str(e), is_error=True)
        if isinstance(out, ToolResult):
            return out
        text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)
        return ToolResult(_clip(text))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + f"\n[... {len(text) - MAX_RESULT_CHARS} more characters]"


class Toolbox:
    """The enabled tools, by name. Names are unique; a call to any other name is refused."""

    def __init__(self, tools: Sequence[AgentTool] = ()) -> None:
        self._tools: dict[str, AgentTool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: AgentTool) -> None:
        if tool.name in self._tools:
            raise InvalidRequestError(f"two tools are named {tool.name!r} ({self._tools[tool.name].source} and {tool.source}); "
                                      "rename one or leave one out", param="tools")
        self._tools[tool.name] = tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self._tools.values()]

    def only(self, names: Sequence[str]) -> Toolbox:
        """The toolbox cut down to `names` (an error names any that is not here)."""
        unknown = [n for n in names if n not in self._tools]
        if unknown:
            raise InvalidRequestError(f"no tool named {', '.join(map(repr, unknown))}; the tools here are: "
                                      f"{', '.join(self._tools) or '(none)'}", param="tool")
        return Toolbox([self._tools[n] for n in names])

    async def call(self, name: str, arguments: str) -> ToolResult:
        """Run the enabled tool `name` on JSON `arguments`; anything else is an error result, nothing runs."""
        tool = self._tools.get(name)
        if tool is None:
            return ToolResult(f"error: {name!r} is not an enabled tool; the enabled tools are: {', '.join(self._tools)}",
                              is_error=True)
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            return ToolResult(f"error: the arguments are not JSON ({e})", is_error=True)
        if not isinstance(args, dict):
            return ToolResult("error: the arguments must be a JSON object", is_error=True)
        missing = [k for k in tool.parameters.get("required", []) if k not in args]
        if missing:
            return ToolResult(f"error: missing argument(s) {', '.join(missing)}", is_error=True)
        return await tool.call(args)


# --- calculator ----------------------------------------------------------------------------------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "cbrt": math.cbrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh, "degrees": math.degrees,
    "radians": math.radians, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round, "min": min,
    "max": max, "hypot": math.hypot, "gcd": math.gcd, "lcm": math.lcm, "factorial": math.factorial,
    "comb": math.comb, "perm": math.perm,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
MAX_EXPRESSION = 500
MAX_BITS = 4096
"""Integers stay below 2**4096 (about 1,233 digits): enough for any real sum, and no input can exhaust memory."""


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % ** (and ^ as a power, as calculators
    read it), parentheses, pi/e/tau, and math functions (sqrt, log, sin, factorial, ...). Raises ToolError."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
    if not text:
        raise ToolError("error: the expression is empty")
    if len(text) > MAX_EXPRESSION:
        raise ToolError(f"error: the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ToolError(f"error: {expression!r} is not an arithmetic expression ({e.msg})") from None
    try:
        return _value(tree.body)
    except (ArithmeticError, ValueError, TypeError) as e:
        raise ToolError(f"error: {e}") from None
    except RecursionError:
        raise ToolError("error: the expression is nested too deeply") from None


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        args = [_value(a) for a in node.args]
        if node.func.id in ("factorial", "comb", "perm") and any(isinstance(a, int) and a > 1000 for a in args):
            raise ValueError(f"{node.func.id} is limited to arguments up to 1000")
        return _bounded(_FUNCTIONS[node.func.id](*args))
    shown = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
    raise ValueError(f"{shown!r} is not allowed: use numbers, + - * / // % **, parentheses, "
                     f"{', '.join(_CONSTANTS)} and {', '.join(sorted(_FUNCTIONS))}")


def _check_power(base: Any, exponent: Any) -> None:
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * max(abs(base).bit_length() - 1, 1) > MAX_BITS):
        raise ValueError(f"{base}**{exponent} is too large (the limit is about 2**{MAX_BITS})")


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ValueError(f"the result is too large (the limit is about 2**{MAX_BITS})")
    return value


def calculator() -> AgentTool:
    def run(args: dict[str, Any]) -> str:
        value = calculate(str(args.get("expression", "")))
        if isinstance(value, float):  # 12 significant digits: 17 / 100 * 2400 is 408, not 408.0000000000006
            value = float(f"{value:.12g}")
            if value.is_integer() and abs(value) < 2**53:
                value = int(value)
        return str(value)

    return AgentTool(
        "calculator",
        "Evaluate an arithmetic expression, like 37 * 91 or sqrt(2) / 3. Use it for every calculation.",
        {"type": "object", "properties": {"expression": {"type": "string", "description": "the expression, e.g. (3 + 4) * 12"}},
         "required": ["expression"]},
        run,
    )


# --- date and time -------------------------------------------------------------------------------------

def current_datetime(now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> AgentTool:
    def run(args: dict[str, Any]) -> str:
        name = str(args.get("timezone") or "UTC")
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"error: unknown timezone {name!r}; use an IANA name such as Europe/Paris or UTC") from None
        local = now().astimezone(zone)
        return f"{local.isoformat(timespec='seconds')} ({local.strftime('%A %d %B %Y, %H:%M')} {name})"

    return AgentTool(
        "current_datetime",
        "The current date and time.",
        {"type": "object", "properties": {"timezone": {"type": "string", "description": "an IANA timezone, default UTC"}}},
        run,
    )


# --- file search ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Passage:
    filename: str
    text: str
    score: float
    page: int | None = None


def file_search(search: Callable[[str, int], Sequence[Passage]], stores: Sequence[str], k: int = 3,
                passage_chars: int = 700) -> AgentTool:
    """`search(query, k)` -> passages; `stores` only names them in the description."""

    def run(args: dict[str, Any]) -> str:
        query = str(args.get("query", "")).strip()
        if not query:
            raise ToolError("error: the query is empty")
        found = search(query, k)
        if not found:
            return "no passages found"
        out = []
        for i, p in enumerate(found, start=1):
            where = p.filename + (f", page {p.page}" if p.page is not None else "")
            text = " ".join(p.text.split())
            out.append(f"[{i}] ({where}) {text[:passage_chars]}")
        return "\n".join(out)

    return AgentTool(
        "file_search",
        f"Search the documents ({', '.join(stores)}) for passages about a query.",
        {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}}, "required": ["query"]},
        run,
    )


# --- files under one folder ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Folder:
    """The one folder whose files an agent may read. `resolve` refuses any path that ends up outside it."""

    root: Path
    max_bytes: int = 64 * 1024
    _resolved: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        resolved = Path(self.root).expanduser().resolve()
        if not resolved.is_dir():
            raise InvalidRequestError(f"{self.root} is not a folder: --allow-dir takes the folder the agent may read",
                                      param="allow_dir")
        object.__setattr__(self, "_resolved", resolved)

    def resolve(self, path: str) -> Path:
        if "\x00" in path:
            raise ToolError("error: the path holds a NUL byte")
        target = (self._resolved / path.lstrip("/")).resolve()
        if not target.is_relative_to(self._resolved):
            raise ToolError(f"error: {path!r} is outside the folder this agent may read")
        return target

    def read(self, path: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"error: no file {path!r} (list_files shows what is there)")
        with target.open("rb") as f:
            data = f.read(self.max_bytes + 1)
        if b"\x00" in data[:4096]:
            raise ToolError(f"error: {path!r} is not a text file")
        text = data[: self.max_bytes].decode("utf-8", errors="replace")
        return text + (f"\n[... cut at {self.max_bytes} bytes]" if len(data) > self.max_bytes else "")

    def list(self, path: str = ".") -> str:
        target = self.resolve(path)
        if not target.is_dir():
            raise ToolError(f"error: no folder {path!r}")
        entries = sorted(target.iterdir())[:200]
        lines = []
        for entry in entries:
            try:
                inside = entry.resolve().is_relative_to(self._resolved)
            except OSError:
                inside = False
            if inside:
                rel = entry.relative_to(self._resolved).as_posix()
                lines.append(rel + "/" if entry.is_dir() else f"{rel} ({entry.stat().st_size} bytes)")
        return "\n".join(lines) or "(empty folder)"


def file_tools(folder: Folder) -> list[AgentTool]:
    path = {"type": "string", "description": "a path relative to the allowed folder"}
    return [
        AgentTool("read_file", "Read a text file from the allowed folder.",
                  {"type": "object", "properties": {"path": path}, "required": ["path"]},
                  lambda args: folder.read(str(args.get("path", "")))),
        AgentTool("list_files", "List the files of a folder inside the allowed folder.",
                  {"type": "object", "properties": {"path": path}},
                  lambda args: folder.list(str(args.get("path") or "."))),
    ]


def retriever_search(retriever: Any, stores: Sequence[str]) -> Callable[[str, int], list[Passage]]:
    """`file_search`'s search over vector stores (by name or id) with a `lamina.llm.rag.Retriever`."""
    ids = [retriever.stores.get(s).id for s in stores]  # an unknown store is an error now, not at the first call

    def search(query: str, k: int) -> list[Passage]:
        return [Passage(hit.filename, hit.text, hit.score, hit.page) for _, hit in retriever.search(ids, query, k=k)]

    return search


def builtin_tools(*, search: Callable[[str, int], Sequence[Passage]] | None = None, stores: Sequence[str] = (),
                  folder: Folder | None = None) -> list[AgentTool]:
    """calculator and current_datetime always; file_search with a search over stores; read_file and
    list_files with a folder."""
    tools = [calculator(), current_datetime()]
    if search is not None:
        tools.append(file_search(search, stores))
    if folder is not None:
        tools += file_tools(folder)
    return tools
