"""The agent: a tool loop on Lamina's tool calling, with a step limit and a token budget, every step recorded.

    agent = Agent(llm, Toolbox([calculator(), current_datetime()]))
    run = agent.run("What is 37 * 91?")          # or `await agent.arun(...)`
    run.answer, run.status, run.steps

Each turn the model sees the conversation and the enabled tools (through its chat template, or the built-in
tools prompt for templates without tools) and either answers or calls tools; started calls are held to the
tools' schemas by the grammar. The calls are run by the `Toolbox` (nothing outside it ever runs), their
results go back as `role: tool` messages, and the loop goes on until the model answers, `max_steps` model
turns have passed, `max_tokens` tokens have been generated, or the model asks again for calls it has made
(`repeated_calls`: their results are already in the conversation). The loop is written once, async (MCP tools
are async); `run` drives it for synchronous code.

Every step is an event (`model`, `tool`, `answer`, `stopped`) given to `on_step` as it happens (the CLI
prints them with rich) and appended to the run's record by `AgentRuns` (one row per step, committed as it
happens, so even a run that dies midway can be read back).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lamina.apps.agents.tools import Toolbox
from lamina.errors import InvalidRequestError, LaminaError
from lamina.infra.db import Database
from lamina.llm import LLM, SamplingParams
from lamina.llm.text.tools import ToolCall, split_calls

SYSTEM = ("You are a helpful assistant with tools. Call a tool when the question needs one (facts from documents, "
          "any arithmetic, look-ups); when the tool results are in, answer the user's question in one or two "
          "sentences, using those results.")
Status = Literal["running", "answered", "step_limit", "token_budget", "repeated_calls", "failed"]
"""repeated_calls: the model asked for calls it had made already (a loop a small model can fall into)."""


@dataclass(frozen=True)
class AgentArgs:
    max_steps: int = 6
    """Model turns at most (each may call several tools)."""
    max_tokens: int = 1024
    """Tokens generated at most, across all turns (the budget)."""
    step_tokens: int = 256
    """Tokens one turn may generate."""
    temperature: float = 0.0
    top_p: float = 1.0
    tool_choice: Literal["auto", "required"] = "auto"
    """For the first turn: `required` makes the model start with a call; later turns are always `auto`."""
    grammar: bool = True
    """Constrain calls to the tools' schemas (off only to measure what the grammar does)."""
    adapter: str | None = None
    """A LoRA adapter loaded into the LLM (`llm.load_adapter`) to run the turns with."""
    system: str = SYSTEM

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_tokens < 1 or self.step_tokens < 1:
            raise InvalidRequestError("max_steps, max_tokens and step_tokens must be at least 1", param="max_steps")
        if self.tool_choice not in ("auto", "required"):
            raise InvalidRequestError(f"tool_choice must be auto or required, not {self.tool_choice!r}", param="tool_choice")


@dataclass(frozen=True)
class Turn:
    """What one model turn gave: the text, the calls, and (prompt tokens, generated tokens, finish reason)."""

    content: str
    calls: list[ToolCall]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


TurnFn = Callable[[list[dict[str, Any]], list[dict[str, Any]], str, SamplingParams], Awaitable[Turn]]
"""(messages, OpenAI tools, tool_choice, sampling) -> Turn: how a turn reaches the model. The default runs the
LLM in this process; the web chat's goes through the API's chat service, so its tokens stream to the page."""


@dataclass
class Step:
    kind: Literal["model", "tool", "answer", "stopped"]
    data: dict[str, Any]
    at: float = field(default_factory=time.time)


@dataclass
class AgentRun:
    id: str
    task: str
    tools: list[str]
    status: Status = "running"
    answer: str = ""
    steps: list[Step] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def calls(self) -> list[str]:
        """The names of the tools called, in order."""
        return [s.data["name"] for s in self.steps if s.kind == "tool"]


class Agent:
    def __init__(self, llm: LLM, tools: Toolbox, args: AgentArgs | None = None, *, runs: AgentRuns | None = None,
                 on_step: Callable[[AgentRun, Step], None] | None = None, turn: TurnFn | None = None) -> None:
        self.llm, self.tools, self.args, self.runs, self.on_step = llm, tools, args or AgentArgs(), runs, on_step
        self.turn: TurnFn = turn or self._local_turn
        if self.args.adapter is not None and self.args.adapter not in llm.adapters:
            raise InvalidRequestError(f"no adapter {self.args.adapter!r} is loaded (loaded: {', '.join(llm.adapters) or 'none'})",
                                      param="adapter")

    def run(self, task: str, history: Sequence[dict[str, Any]] = ()) -> AgentRun:
        return asyncio.run(self.arun(task, history))

    async def arun(self, task: str, history: Sequence[dict[str, Any]] = ()) -> AgentRun:
        if not task or not task.strip():
            raise InvalidRequestError("the task is empty: say what the agent should do", param="task")
        run = AgentRun(f"run_{uuid.uuid4().hex[:20]}", task, self.tools.names)
        if self.runs is not None:
            self.runs.start(run)
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.args.system}, *history,
                                          {"role": "user", "content": task}]
        try:
            await self._loop(run, messages)
        except LaminaError as e:
            self._record(run, Step("stopped", {"reason": "failed", "error": e.message}))
            run.status = "failed"
            raise
        finally:
            run.finished_at = time.time()
            if self.runs is not None:
                self.runs.finish(run)
        return run

    async def _loop(self, run: AgentRun, messages: list[dict[str, Any]]) -> None:
        done_calls: set[tuple[str, str]] = set()
        for turn in range(self.args.max_steps):
            left = self.args.max_tokens - run.completion_tokens
            if left <= 0:
                self._stop(run, "token_budget")
                return
            choice = self.args.tool_choice if turn == 0 else "auto"
            params = SamplingParams(max_tokens=min(self.args.step_tokens, left), temperature=self.args.temperature,
                                    top_p=self.args.top_p)
            got = await self.turn(messages, self.tools.specs(), choice, params)
            content, calls = got.content, got.calls
            run.prompt_tokens += got.prompt_tokens
            run.completion_tokens += got.completion_tokens
            self._record(run, Step("model", {"turn": turn, "content": content, "finish_reason": got.finish_reason,
                                             "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls],
                                             "prompt_tokens": got.prompt_tokens, "completion_tokens": got.completion_tokens}))
            if not calls:
                if got.finish_reason == "length":
                    self._stop(run, "token_budget" if run.completion_tokens >= self.args.max_tokens else "step_tokens", content)
                    return
                run.answer, run.status = content.strip(), "answered"
                self._record(run, Step("answer", {"content": run.answer}))
                return
            made = [(c.name, _canonical(c.arguments)) for c in calls]
            if all(m in done_calls for m in made):  # the same calls again: their results are already above
                self._stop(run, "repeated_calls", content)
                return
            done_calls.update(made)
            messages.append({"role": "assistant", "content": content or None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]})
            for call in calls:
                started = time.perf_counter()
                result = await self.tools.call(call.name, call.arguments)
                self._record(run, Step("tool", {"call_id": call.id, "name": call.name, "arguments": call.arguments,
                                                "enabled": call.name in self.tools, "result": result.text,
                                                "is_error": result.is_error, "ms": round((time.perf_counter() - started) * 1e3, 2)}))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result.text})
        self._stop(run, "step_limit")

    async def _local_turn(self, messages: list[dict[str, Any]], specs: list[dict[str, Any]], choice: str,
                          params: SamplingParams) -> Turn:
        return await asyncio.to_thread(self._generate, messages, specs, choice, params)

    def _generate(self, messages: list[dict[str, Any]], specs: list[dict[str, Any]], choice: str, params: SamplingParams) -> Turn:
        adapter = self.args.adapter
        if not specs:
            done = self.llm.chat(messages, params, adapter=adapter)
            return Turn(done.text, [], done.prompt_tokens, done.completion_tokens, done.finish_reason)
        if self.args.grammar:
            done = self.llm.chat(messages, params, adapter=adapter, tools=specs, tool_choice=choice)
            return Turn(done.text, done.tool_calls, done.prompt_tokens, done.completion_tokens, done.finish_reason)
        plan = self.llm.tool_plan(specs, choice)
        assert plan is not None
        ids = self.llm.encode_chat(messages, tools=plan)
        text, count, finish = [], 0, "length"
        for delta in self.llm.stream_ids(ids, params, adapter):
            text.append(delta.text)
            count += len(delta.token_ids)
            finish = delta.finish_reason or finish
        content, calls = split_calls(plan.format, "".join(text))
        return Turn(content, calls, len(ids), count, "tool_calls" if calls else finish)

    def _stop(self, run: AgentRun, reason: str, content: str = "") -> None:
        run.status = {"token_budget": "token_budget", "step_tokens": "token_budget",
                      "repeated_calls": "repeated_calls"}.get(reason, "step_limit")  # type: ignore[assignment]
        run.answer = content.strip()
        self._record(run, Step("stopped", {"reason": reason, "content": run.answer}))

    def _record(self, run: AgentRun, step: Step) -> None:
        run.steps.append(step)
        if self.runs is not None:
            self.runs.add_step(run, step)
        if self.on_step is not None:
            self.on_step(run, step)


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except ValueError:
        return arguments


# --- the record of runs --------------------------------------------------------------------------------

MIGRATIONS = {
    "sqlite": [
        """
        CREATE TABLE agent_runs (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            tools TEXT NOT NULL,
            status TEXT NOT NULL,
            answer TEXT NOT NULL DEFAULT '',
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            started_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE INDEX agent_runs_started ON agent_runs (started_at);
        CREATE TABLE agent_steps (
            run_id TEXT NOT NULL REFERENCES agent_runs (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (run_id, position)
        )
        """,
    ],
    "postgresql": [
        """
        CREATE TABLE agent_runs (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            tools TEXT NOT NULL,
            status TEXT NOT NULL,
            answer TEXT NOT NULL DEFAULT '',
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            started_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION
        );
        CREATE INDEX agent_runs_started ON agent_runs (started_at);
        CREATE TABLE agent_steps (
            run_id TEXT NOT NULL REFERENCES agent_runs (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, position)
        )
        """,
    ],
}


class RunNotFound(LaminaError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "run_not_found"


class AgentRuns:
    """Agent runs in the database: a row per run, a row per step, each committed as it happens."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("agents", MIGRATIONS)

    def start(self, run: AgentRun) -> None:
        self.db.execute("INSERT INTO agent_runs (id, task, tools, status, started_at) VALUES (?, ?, ?, ?, ?)",
                        (run.id, run.task, json.dumps(run.tools), run.status, run.started_at))

    def add_step(self, run: AgentRun, step: Step) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO agent_steps (run_id, position, kind, data, at) VALUES (?, ?, ?, ?, ?)",
                         (run.id, len(run.steps) - 1, step.kind, json.dumps(step.data, ensure_ascii=False), step.at))
            conn.execute("UPDATE agent_runs SET prompt_tokens = ?, completion_tokens = ? WHERE id = ?",
                         (run.prompt_tokens, run.completion_tokens, run.id))

    def finish(self, run: AgentRun) -> None:
        self.db.execute("UPDATE agent_runs SET status = ?, answer = ?, prompt_tokens = ?, completion_tokens = ?, finished_at = ? "
                        "WHERE id = ?", (run.status, run.answer, run.prompt_tokens, run.completion_tokens, run.finished_at, run.id))

    def list(self, limit: int = 20) -> list[AgentRun]:
        rows = self.db.query("SELECT * FROM agent_runs ORDER BY started_at DESC LIMIT ?", (limit,))
        return [self._run(r, []) for r in rows]

    def get(self, run_id: str) -> AgentRun:
        row = self.db.query_one("SELECT * FROM agent_runs WHERE id = ?", (run_id,))
        if row is None:
            raise RunNotFound(f"no agent run {run_id!r}; `lamina agent --list` shows the recent ones", param="run")
        steps = [Step(s["kind"], json.loads(s["data"]), s["at"]) for s in
                 self.db.query("SELECT kind, data, at FROM agent_steps WHERE run_id = ? ORDER BY position", (run_id,))]
        return self._run(row, steps)

    @staticmethod
    def _run(row: Any, steps: list[Step]) -> AgentRun:
        return AgentRun(row["id"], row["task"], json.loads(row["tools"]), row["status"], row["answer"], steps,
                        row["prompt_tokens"], row["completion_tokens"], row["started_at"], row["finished_at"])
