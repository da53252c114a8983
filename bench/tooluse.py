"""Tool use by the default model (SmolLM2-135M-Instruct) on held-out tasks, with and without the grammar.

Question: given a request and a few tools (the right one among distractors, or none that fits), does the model
call the right tool with valid and correct arguments when a call is required, and does it choose rightly between
answering and calling when the choice is its own (`auto`)? And how much of that is the grammar's doing?

Each task: a user request, three tools (from a catalog of twelve), the expected tool (or none) and the argument
values a correct call holds. Tasks are generated from templates and entities with a fixed seed; no task is ever
used for training (Lamina ships no tool-use adapter; `lamina finetune sft` could make one from data like this,
which this benchmark would then score). Run in-process through `LLM.chat`, greedy, 160 tokens at most:
- with the grammar: `tools=`, `tool_choice=` as the API takes them (every call's arguments forced valid);
- without: the same prompt (the same tools system turn), free decoding, the output parsed the same way.

    python bench/tooluse.py [--tasks 120]

Prints the table and writes bench/results/tooluse.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S = {"type": "string"}
CATALOG: dict[str, tuple[str, dict[str, Any]]] = {
    "get_weather": ("Current weather for a city", {"city": S}),
    "get_time": ("Current local time in a city", {"city": S}),
    "convert_currency": ("Convert an amount from one currency to another", {"amount": {"type": "number"}, "source": S, "target": S}),
    "send_email": ("Send an email", {"to": S, "subject": S}),
    "set_timer": ("Start a countdown timer", {"minutes": {"type": "integer"}}),
    "translate": ("Translate text into a language", {"text": S, "language": S}),
    "get_stock_price": ("Latest price of a stock by ticker symbol", {"ticker": S}),
    "search_flights": ("Find flights between two cities", {"origin": S, "destination": S}),
    "play_music": ("Play a song or an artist", {"query": S}),
    "get_news": ("Latest news headlines on a topic", {"topic": S}),
    "define_word": ("Dictionary definition of a word", {"word": S}),
    "calculate": ("Evaluate an arithmetic expression", {"expression": S}),
}
CITIES = ["Paris", "Tokyo", "Berlin", "Madrid", "Cairo", "Lima", "Oslo", "Seoul", "Toronto", "Nairobi", "Rome", "Sydney", "Chicago",
          "Mumbai", "Lisbon"]
TEMPLATES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "get_weather": [("What's the weather in {city}?", {"city": "{city}"}), ("Is it raining in {city} right now?", {"city": "{city}"}),
                    ("How hot is it today in {city}?", {"city": "{city}"})],
    "get_time": [("What time is it in {city}?", {"city": "{city}"}), ("Tell me the current time in {city}.", {"city": "{city}"})],
    "convert_currency": [("Convert {n} dollars to euros.", {"amount": "{n}", "source": "USD", "target": "EUR"}),
                         ("How much is {n} euros in yen?", {"amount": "{n}", "source": "EUR", "target": "JPY"})],
    "send_email": [("Send an email to {name}@example.com with the subject {topic}.", {"to": "{name}@example.com", "subject": "{topic}"})],
    "set_timer": [("Set a timer for {m} minutes.", {"minutes": "{m}"}), ("Start a {m} minute countdown.", {"minutes": "{m}"})],
    "translate": [("Translate 'good morning' into {lang}.", {"text": "good morning", "language": "{lang}"})],
    "get_stock_price": [("What is the stock price of {ticker}?", {"ticker": "{ticker}"}),
                        ("How is {ticker} trading today?", {"ticker": "{ticker}"})],
    "search_flights": [("Find me a flight from {city} to {city2}.", {"origin": "{city}", "destination": "{city2}"})],
    "play_music": [("Play some {artist}.", {"query": "{artist}"})],
    "get_news": [("What are the latest news about {topic}?", {"topic": "{topic}"})],
    "define_word": [("What does the word '{word}' mean?", {"word": "{word}"})],
    "calculate": [("What is {a} times {b}?", {"expression": "{a}"})],
}
CHAT = ["Tell me a joke about cats.", "Write a haiku about the sea.", "Hi! How are you?", "What is your name?",
        "Give me three tips for better sleep.", "Why is the sky blue?", "Write a short poem about autumn.",
        "What is the capital of France?", "Explain what a noun is.", "Say something nice.", "Who wrote Romeo and Juliet?",
        "What colour do you get by mixing blue and yellow?", "Summarise the plot of Cinderella in one sentence.",
        "Name three fruits.", "How many legs does a spider have?"]
FILL = {"name": ["alice", "bob", "carol", "dave"], "topic": ["budget", "holidays", "football", "elections", "climate"],
        "lang": ["French", "Spanish", "German", "Italian"], "ticker": ["AAPL", "MSFT", "TSLA", "NVDA"],
        "artist": ["Beethoven", "Taylor Swift", "jazz", "the Beatles"], "word": ["serendipity", "ephemeral", "ubiquitous"]}


@dataclass
class Task:
    prompt: str
    tools: list[str]
    expected: str | None
    """The tool a correct answer calls (None: answer without a call)."""
    args: dict[str, str]


def tasks(count: int, seed: int = 7) -> list[Task]:
    rng = random.Random(seed)
    out: list[Task] = []
    names = sorted(CATALOG)
    while len(out) < count:
        if len(out) % 4 == 3:  # a quarter: nothing to call
            out.append(Task(rng.choice(CHAT), rng.sample(names, 3), None, {}))
            continue
        tool = names[len(out) % len(names)]
        text, args = rng.choice(TEMPLATES[tool])
        values = {"city": rng.choice(CITIES), "city2": rng.choice(CITIES), "n": str(rng.choice([20, 50, 120, 300])),
                  "m": str(rng.choice([5, 10, 25])), "a": str(rng.randint(3, 19)), "b": str(rng.randint(3, 19)),
                  **{k: rng.choice(v) for k, v in FILL.items()}}
        distractors = rng.sample([n for n in names if n != tool], 2)
        tools = rng.sample([tool, *distractors], 3)
        out.append(Task(text.format(**values), tools, tool, {k: v.format(**values) for k, v in args.items()}))
    return out


def _openai_tools(names: list[str]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "description": CATALOG[n][0], "parameters": {
        "type": "object", "properties": CATALOG[n][1], "required": sorted(CATALOG[n][1])}}} for n in names]


def _score(task: Task, calls: list[Any]) -> dict[str, bool]:
    import jsonschema

    if not calls:
        return {"called": False, "right_tool": False, "valid": False, "correct": False}
    call = calls[0]
    right = call.name == task.expected
    try:
        args = json.loads(call.arguments)
        schema = {"type": "object", "properties": CATALOG[call.name][1], "required": sorted(CATALOG[call.name][1])} if call.name in CATALOG else {}
        valid = call.name in CATALOG and not list(jsonschema.Draft202012Validator(schema).iter_errors(args))
    except (json.JSONDecodeError, TypeError):
        args, valid = {}, False
    correct = right and valid and all(str(v).lower() in str(args.get(k, "")).lower() for k, v in task.args.items())
    return {"called": True, "right_tool": right, "valid": valid, "correct": correct}


def _run(llm: Any, task: Task, choice: str, grammar: bool) -> dict[str, Any]:
    from lamina.llm.engine.sampling import SamplingParams
    from lamina.llm.text.tools import ToolStream

    messages = [{"role": "user", "content": task.prompt}]
    tools = _openai_tools(task.tools)
    if grammar:
        c = llm.chat(messages, tools=tools, tool_choice=choice, temperature=0, max_tokens=160)
        return {"text": c.text, "calls": c.tool_calls}
    plan = llm.tool_plan(tools, choice)
    ids = llm.encode_chat(messages, tools=plan)
    text = "".join(d.text for d in llm.stream_ids(ids, SamplingParams(max_tokens=160, temperature=0)))
    split = ToolStream(plan.format)
    content, _ = split.push(text)
    content += split.finish()
    return {"text": content, "calls": split.calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tooluse.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lamina import LLM
    from lamina.infra.device import cpu_features

    llm = LLM.load()
    todo = tasks(args.tasks)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for grammar in (False, True):
        label = "grammar" if grammar else "no_grammar"
        calls = [t for t in todo if t.expected]
        req = [_score(t, _run(llm, t, "required", grammar)["calls"]) for t in calls]
        auto = []
        for t in todo:
            got = _run(llm, t, "auto", grammar)
            s = _score(t, got["calls"])
            s["right_choice"] = s["called"] == (t.expected is not None)
            s["should_call"] = t.expected is not None
            auto.append(s)
        n = len(req)
        results[label] = {
            "required": {"tasks": n, "called": sum(r["called"] for r in req) / n, "right_tool": sum(r["right_tool"] for r in req) / n,
                         "valid_arguments": sum(r["valid"] for r in req) / n, "correct": sum(r["correct"] for r in req) / n},
            "auto": {"tasks": len(auto), "right_choice": sum(a["right_choice"] for a in auto) / len(auto),
                     "called_when_it_should": sum(a["called"] for a in auto if a["should_call"]) / max(1, sum(a["should_call"] for a in auto)),
                     "answered_when_it_should": sum(not a["called"] for a in auto if not a["should_call"])
                     / max(1, sum(not a["should_call"] for a in auto)),
                     "valid_when_called": sum(a["valid"] for a in auto if a["called"]) / max(1, sum(a["called"] for a in auto))},
        }
        print(label, json.dumps(results[label]), flush=True)
    llm.close()
    machine = {"cpu": platform.processor() or platform.machine(), "features": cpu_features(), "threads": 2}
    args.out.write_text(json.dumps({"machine": machine, "tasks": len(todo), "seconds": time.perf_counter() - start, **results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
