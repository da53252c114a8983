"""Agent evaluation: SmolLM2-135M-Instruct doing tasks that need one to three tool calls over the pydoc store
and the calculator, without the grammar, with it, and with the shipped tool-use adapter.

Question: how often does `Agent` (Lamina's tool loop) end with the right answer? A task succeeds when the final
answer holds every expected value: the keyword a pydoc passage gives (AssertionError, continue, __len__, ...)
and/or the number the calculator computes (numbers compared by value, so 65,536 and 65536.0 count). Also
reported: whether the tools a task needs were called, turns and tokens. The tasks are written here, over
Python's own documentation; the adapter's training data (`lamina.apps.agents.traindata`) holds invented
documents and never these questions. Greedy decoding, tools: file_search (the pydoc store), calculator,
current_datetime; at most 4 turns and 768 tokens per task.

    lamina ingest pydoc --store pydoc      # once
    python bench/agent.py [--tasks N]

Prints the table and writes bench/results/agent.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    question: str
    expect: tuple[str | float, ...]
    """Keywords (str, matched as words) and numbers (compared by value) the answer must hold."""
    tools: tuple[str, ...]
    """The tools the task needs."""


D, C = "file_search", "calculator"
TASKS = [
    # one look-up in the docs
    Task("Which exception does the assert statement raise when its expression is false?", ("AssertionError",), (D,)),
    Task("Which statement does nothing and is used as a placeholder where a statement is required?", ("pass",), (D,)),
    Task("Which statement skips the rest of a loop body and goes on with the next iteration?", ("continue",), (D,)),
    Task("Which statement terminates the nearest enclosing loop?", ("break",), (D,)),
    Task("Which keyword makes a function a generator when it appears in the function body?", ("yield",), (D,)),
    Task("Which special method does str() call to get the string form of an object?", ("__str__",), (D,)),
    Task("Which statement removes the binding of a name?", ("del",), (D,)),
    Task("Which keyword creates an anonymous function in an expression?", ("lambda",), (D,)),
    Task("Which special method does len() call on an object?", ("__len__",), (D,)),
    Task("Which method does the with statement call on the context manager when the block is entered?", ("__enter__",), (D,)),
    Task("Which statement makes names in a function refer to variables at module level?", ("global",), (D,)),
    Task("Which statement rebinds a variable of the enclosing function, not a global one?", ("nonlocal",), (D,)),
    # one calculation
    Task("What is 37 * 91?", (3367,), (C,)),
    Task("What is (125 + 375) / 4?", (125,), (C,)),
    Task("What is 2 to the power of 16?", (65536,), (C,)),
    Task("How many seconds are there in 6 hours?", (21600,), (C,)),
    Task("What is 17% of 2400?", (408,), (C,)),
    Task("What is the square root of 1764?", (42,), (C,)),
    Task("What is 1234 - 567 * 2?", (100,), (C,)),
    Task("What is 999 * 999?", (998001,), (C,)),
    Task("How many minutes are there in a week?", (10080,), (C,)),
    Task("What is 7.5 * 12.4?", (93,), (C,)),
    # a look-up and a calculation
    Task("Which exception does assert raise when it fails? Also, what is 23 * 47?", ("AssertionError", 1081), (D, C)),
    Task("Which statement ends a loop early? And what is 144 / 12?", ("break", 12), (D, C)),
    Task("What keyword defines an anonymous function, and what is 19 * 21?", ("lambda", 399), (D, C)),
    Task("Which special method does len() call? Then compute 2 ** 10.", ("__len__", 1024), (D, C)),
    Task("Which method initialises a new instance after it is created? Also compute 365 * 24.", ("__init__", 8760), (D, C)),
    Task("Which statement is a no-op placeholder? And how much is 88 + 99 + 111?", ("pass", 298), (D, C)),
    Task("Which keyword turns a function into a generator? Also, what is 81 / 9?", ("yield", 9), (D, C)),
    Task("Which statement deletes a name binding? And what is 15 * 15?", ("del", 225), (D, C)),
    # three calls
    Task("What are 12 * 12 and 13 * 13? Also, which statement skips to the next loop iteration?", (144, 169, "continue"), (D, C, C)),
    Task("Compute 250 * 4 and 1000 / 8, and tell me which method the with statement calls on entry.", (1000, 125, "__enter__"), (D, C, C)),
    Task("Which exception does assert raise, and which method makes instances callable? Also compute 6 * 7.",
         ("AssertionError", "__call__", 42), (D, D, C)),
    Task("What is 3 ** 5, what is 5 ** 3, and which keyword declares a module-level name in a function?", (243, 125, "global"), (D, C, C)),
    Task("How many hours are in 3 days, how many in 5 days, and which keyword creates an anonymous function?", (72, 120, "lambda"), (D, C, C)),
    Task("Which statement ends a loop and which one skips an iteration? And what is 11 * 11?", ("break", "continue", 121), (D, D, C)),
]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def succeeded(task: Task, answer: str) -> bool:
    numbers = [float(n) for n in NUMBER.findall(answer.replace(",", ""))]
    for want in task.expect:
        if isinstance(want, str):
            if not re.search(rf"(?<![A-Za-z_]){re.escape(want)}(?![A-Za-z_])", answer):
                return False
        elif not any(abs(n - want) < 1e-6 * max(1.0, abs(want)) for n in numbers):
            return False
    return True


def evaluate(llm: Any, box: Any, tasks: list[Task], grammar: bool, adapter: str | None) -> dict[str, Any]:
    from lamina.apps.agents import Agent, AgentArgs

    agent = Agent(llm, box, AgentArgs(max_steps=4, max_tokens=768, grammar=grammar, adapter=adapter))
    rows = []
    for task in tasks:
        run = agent.run(task.question)
        called = run.calls()
        rows.append({"question": task.question, "ok": succeeded(task, run.answer), "status": run.status,
                     "needed_called": all(called.count(t) >= 1 for t in set(task.tools)), "calls": called,
                     "turns": sum(s.kind == "model" for s in run.steps), "tokens": run.completion_tokens, "answer": run.answer})
    n = len(rows)
    return {"success": sum(r["ok"] for r in rows) / n, "needed_tools_called": sum(r["needed_called"] for r in rows) / n,
            "answered": sum(r["status"] == "answered" for r in rows) / n,
            "mean_turns": sum(r["turns"] for r in rows) / n, "mean_tokens": sum(r["tokens"] for r in rows) / n, "tasks": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=len(TASKS))
    parser.add_argument("--store", default="pydoc")
    parser.add_argument("--adapter", action="append", default=[], metavar="FOLDER",
                        help="also score this tool-use adapter (with the grammar); repeatable")
    a = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from lamina.apps.agents import Toolbox
    from lamina.apps.agents.adapters import use_tool_adapter
    from lamina.apps.agents.tools import builtin_tools, retriever_search
    from lamina.foundation.embeddings import Embedder
    from lamina.infra.db import open_database
    from lamina.infra.vectorstore import VectorStores
    from lamina.llm import LLM
    from lamina.llm.rag import Retriever
    from lamina.settings import get_settings

    home = get_settings().home
    retriever = Retriever(VectorStores(open_database(home / "lamina.db"), home / "vector_stores"),
                          Embedder.load("all-minilm-l6-v2", device="cpu", dtype="float32", home=home))
    box = Toolbox(builtin_tools(search=retriever_search(retriever, [a.store]), stores=[a.store]))
    llm = LLM.load(None)
    adapter = use_tool_adapter(llm, "auto")
    tasks = TASKS[: a.tasks]
    configs = [("base, no grammar", False, None), ("base, grammar", True, None)]
    if adapter:
        configs += [("adapter, no grammar", False, adapter), ("adapter, grammar", True, adapter)]
    for i, folder in enumerate(a.adapter):
        llm.load_adapter(f"extra{i}", folder)
        configs.append((f"{Path(folder).name}, grammar", True, f"extra{i}"))
    started = time.perf_counter()
    results = {}
    for label, grammar, which in configs:
        results[label] = evaluate(llm, box, tasks, grammar, which)
        r = results[label]
        print(f"{label:22} success {r['success']:6.1%}  needed tools called {r['needed_tools_called']:6.1%}  "
              f"answered {r['answered']:6.1%}  turns {r['mean_turns']:.2f}  tokens {r['mean_tokens']:.0f}", flush=True)
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    out = {"machine": {"cpu": cpu, "features": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()],
                       "threads": torch.get_num_threads()},
           "model": llm.name, "adapter": adapter, "dtype": str(llm.dtype), "tasks": len(tasks),
           "seconds": round(time.perf_counter() - started, 1), "results": results}
    path = Path(__file__).parent / "results" / "agent.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"-> {path}")
    llm.close()


if __name__ == "__main__":
    main()
