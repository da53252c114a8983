"""Tool-use training data for small models: whole agent runs (question, calls, results, answer), generated.

The shipped tool-use adapter of SmolLM2-135M-Instruct (`adapters/smollm2-135m-tools`) was trained on this
data with `lamina finetune sft`. Every example is one agent run rendered the way `Agent` renders it (its
system prompt, the tools shown through the model's tool format, calls in `<tool_call>`, results in
`<tool_response>`), so the adapter learns exactly what it is asked at run time:

- arithmetic -> calculator -> the answer with the computed value;
- a question on documents -> file_search -> the answer copied from the passage that holds it (the documents
  are invented: fictional protocols, libraries and formats, never the pydoc store the evaluation uses);
- both in a row (look a number up, then compute with it), and two or three independent calls in one turn;
- passages that do not hold the answer, answered as such (never the same search again);
- the date, and look-ups on tools with other names (as MCP servers offer them), so the names in the list
  are read rather than memorised;
- chat that needs no tool, answered with the base model's own answer (self-distilled), so `auto` still answers.

    python -m lamina.apps.agents.traindata OUT.jsonl [--seed 0] [--model MODEL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lamina.apps.agents.agent import SYSTEM
from lamina.apps.agents.tools import calculate, calculator, current_datetime, file_search
from lamina.llm.text.tools import ToolFormat, call_id, tools_from_openai

S = {"type": "string"}
DISTRACTORS = [
    ("find_recipe", "Find a cooking recipe for a dish", {"dish": S}, ["dish"]),
    ("track_parcel", "Where a parcel is, by tracking number", {"number": S}, ["number"]),
    ("reserve_table", "Book a restaurant table", {"restaurant": S, "people": {"type": "integer"}}, ["restaurant", "people"]),
    ("turn_on_lights", "Switch on the lights of a room", {"room": S}, ["room"]),
    ("create_reminder", "Create a reminder", {"text": S, "when": S}, ["text", "when"]),
    ("lookup_contact", "Phone number of a contact", {"name": S}, ["name"]),
    ("open_ticket", "Open a support ticket", {"title": S}, ["title"]),
    ("list_events", "Calendar events of a day", {"day": S}, ["day"]),
]
STORES = ["manuals", "handbook", "docs", "wiki", "notes", "pydoc"]
SYLLABLES = ["zor", "bla", "quen", "mar", "vel", "tik", "dra", "lun", "pex", "or", "sim", "kar", "ny", "fal", "bru", "zen",
             "ith", "gor", "wen", "tal"]
KINDS = ["protocol", "library", "format", "statement", "module", "engine", "framework", "service", "compiler", "tool"]
UNITS = ["channels", "threads", "stages", "retries", "workers", "buffers", "layers", "ports", "modes", "levels"]
ERRORS = ["TimeoutError", "ValueError", "OverflowError", "KeyError", "PermissionError", "LookupError", "RuntimeError"]
CONDITIONS = ["the input is empty", "a key is missing", "the queue is full", "the file is locked", "a value is negative",
              "the connection drops"]
PURPOSES = ["compress log files", "schedule background jobs", "parse configuration files", "cache web pages",
            "sign messages", "resize images", "translate user interfaces", "index search results"]
SETTINGS_ = [("timeout", ["30 seconds", "5 minutes", "2 seconds", "90 seconds"]), ("port", ["8080", "5432", "9000", "6379"]),
             ("encoding", ["UTF-8", "Latin-1", "ASCII"]), ("log level", ["INFO", "WARNING", "DEBUG"])]
PEOPLE = ["Ada Brennan", "Ravi Sethi", "Mei Tanaka", "Lars Holm", "Nora Quist", "Omar Haddad"]
FILLER = ["It is described in the reference manual.", "Later versions kept the same design.",
          "Most users never change this.", "The behaviour is documented in the changelog.",
          "See the tutorial for a longer example.", "This section also covers the command line options."]
CHAT = ["Tell me a joke about cats.", "Write a haiku about the sea.", "Hi! How are you?", "What is your name?",
        "Give me three tips for better sleep.", "Why is the sky blue?", "Write a short poem about autumn.",
        "What is the capital of Italy?", "Explain what a verb is.", "Say something nice.", "Who painted the Mona Lisa?",
        "What colour do you get by mixing red and white?", "Summarise the plot of Snow White in one sentence.",
        "Name three vegetables.", "How many legs does an insect have?", "Thank you!", "Good morning!",
        "What is a synonym of happy?", "Give me a motivational quote.", "What should I cook tonight?",
        "Describe a sunset in two sentences.", "What is the opposite of cold?", "Can you recommend a good book?",
        "What is photosynthesis?", "Tell me a fun fact about octopuses.", "How do I say hello in Spanish?",
        "What is the largest planet?", "Write one sentence about friendship.", "Which is heavier, a kilo of iron or a kilo of feathers?",
        "What does a librarian do?", "Goodbye!", "What is a haiku?", "Why do cats purr?", "Suggest a name for a dog.",
        "What is the boiling point of water in Celsius?", "Who was Albert Einstein?", "Explain gravity to a child.",
        "What is your favourite colour?", "Give me two ideas for a weekend trip.", "What is a prime number?"]


def _tool(spec: tuple[str, str, dict[str, Any], list[str]]) -> dict[str, Any]:
    name, description, props, required = spec
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": props, "required": required}}}


_STOP = frozenset([
    "which", "what", "whats", "does", "do", "did", "is", "are", "was", "were", "the", "a", "an", "of", "to",
    "when", "how", "many", "much", "who", "whom", "according", "docs", "documents", "document", "look", "up",
    "search", "check", "for", "it", "its", "that", "and", "by", "in", "use", "uses", "used", "has", "have",
    "written", "also", "then", "tell", "me", "find", "please", "there", "this", "these", "those", "be",
    "can", "could", "would", "should", "says", "say", "about", "default"
])
"""Question words and fillers, left out of the queries the examples search with."""


def query_of(question: str) -> str:
    """A search query as a user's question gives it: its words, less the question words and fillers."""
    words = [w for w in re.findall(r"[A-Za-z0-9_]+", question) if w.lower() not in _STOP]
    return " ".join(words) or question


class Generator:
    def __init__(self, seed: int, chat_answer: Callable[[str], str] | None) -> None:
        self.rng = random.Random(seed)
        self.chat_answer = chat_answer

    def name(self) -> str:
        return "".join(self.rng.sample(SYLLABLES, self.rng.choice([2, 3]))).capitalize()

    def tools(self, *needed: dict[str, Any], extra: int | None = None) -> list[dict[str, Any]]:
        pool = [_tool(d) for d in self.rng.sample(DISTRACTORS, self.rng.randint(0, 2) if extra is None else extra)]
        tools = list(needed) + pool
        self.rng.shuffle(tools)
        return tools

    def standard(self) -> list[dict[str, Any]]:
        """The built-in tools, exactly as `lamina agent` offers them."""
        stores = ", ".join(self.rng.sample(STORES, self.rng.choice([1, 1, 2])))
        chosen = [calculator().spec(), file_search(lambda q, k: [], stores.split(", ")).spec()]
        if self.rng.random() < 0.6:
            chosen.append(current_datetime().spec())
        return chosen

    # --- facts in invented documents ----------------------------------------------------------------------

    def fact(self) -> dict[str, Any]:
        """An invented fact, the question it answers, and the query a search for it takes (the question's words)."""
        f = self._fact()
        return {**f, "query": query_of(f["q"])}

    def _fact(self) -> dict[str, Any]:
        name, kind = self.name(), self.rng.choice(KINDS)
        what = f"the {name} {kind}"
        pick = self.rng.randrange(5)
        if pick == 0:
            n, unit = self.rng.randint(2, 64), self.rng.choice(UNITS)
            return {"fact": f"The {name} {kind} uses {n} {unit}.", "q": self.rng.choice([
                f"How many {unit} does {what} use?", f"According to the docs, how many {unit} does {name} use?",
                f"Look up how many {unit} {what} has."]), "query": "", "number": n, "unit": unit,
                "answer": f"The {name} {kind} uses {n} {unit}.", "name": name, "kind": kind}
        if pick == 1:
            err, cond = self.rng.choice(ERRORS), self.rng.choice(CONDITIONS)
            return {"fact": f"The {name} {kind} raises {err} when {cond}.", "q": self.rng.choice([
                f"Which error does {what} raise when {cond}?", f"What exception does {name} raise when {cond}?"]),
                "query": "", "answer": f"{name} raises {err} when {cond}.", "name": name, "kind": kind}
        if pick == 2:
            person, year = self.rng.choice(PEOPLE), self.rng.randint(1975, 2024)
            return {"fact": f"The {name} {kind} was written by {person} in {year}.", "q": self.rng.choice([
                f"Who wrote {what}?", f"When was {what} written, and by whom?"]), "query": "",
                "number": year, "unit": "year", "answer": f"{what.capitalize()} was written by {person} in {year}.",
                "name": name, "kind": kind}
        if pick == 3:
            purpose = self.rng.choice(PURPOSES)
            return {"fact": f"{name} is a {kind} used to {purpose}.", "q": self.rng.choice([
                f"What is {name} used for?", f"Search the documents: what does {name} do?"]), "query": "",
                "answer": f"{name} is a {kind} used to {purpose}.", "name": name, "kind": kind}
        setting, values = self.rng.choice(SETTINGS_)
        value = self.rng.choice(values)
        return {"fact": f"The default {setting} of {name} is {value}.", "q": self.rng.choice([
            f"What is the default {setting} of {name}?", f"Check the docs for the default {setting} of {what}."]),
            "query": "", "answer": f"The default {setting} of {name} is {value}.",
            "name": name, "kind": kind}

    def passages(self, fact: dict[str, Any]) -> str:
        others = [self.fact() for _ in range(self.rng.randint(1, 2))]
        items = [fact, *others]
        self.rng.shuffle(items)
        lines = []
        for i, f in enumerate(items, start=1):
            around = self.rng.sample(FILLER, 2)
            text = " ".join([around[0], f["fact"], around[1]] if self.rng.random() < 0.5 else [f["fact"], *around])
            lines.append(f"[{i}] ({f['name'].lower()}.txt) {text}")
        return "\n".join(lines)

    # --- examples --------------------------------------------------------------------------------------

    def calc_task(self) -> tuple[str, str, str]:
        a, b, c = self.rng.randint(2, 999), self.rng.randint(2, 99), self.rng.randint(2, 50)
        pick = self.rng.randrange(8)
        q, expr = [
            (f"What is {a} * {b}?", f"{a} * {b}"), (f"Compute ({a} + {b}) * {c}.", f"({a} + {b}) * {c}"),
            (f"What is {c}% of {a}?", f"{c} / 100 * {a}"), (f"How many seconds are there in {c} hours?", f"{c} * 3600"),
            (f"What is the square root of {a * a}?", f"sqrt({a * a})"), (f"Divide {a * c} by {c}.", f"{a * c} / {c}"),
            (f"What is {a} minus {b} times {c}?", f"{a} - {b} * {c}"), (f"Calculate {b} to the power of 3.", f"{b} ** 3"),
        ][pick]
        return q, expr, str(self._value(expr))

    def _value(self, expr: str) -> int | float:
        v = calculate(expr)
        if isinstance(v, float):
            v = int(v) if v.is_integer() else round(v, 6)
        return v

    def example(self) -> dict[str, Any]:
        kind = self.rng.choices(["calc", "doc", "doc_calc", "parallel", "triple", "not_found", "date", "lookup", "chat"],
                                weights=[16, 16, 12, 14, 6, 6, 4, 10, 12])[0]
        return getattr(self, f"_{kind}")()

    def _calc(self) -> dict[str, Any]:
        q, expr, value = self.calc_task()
        return self._run(self.tools(*self.standard()), q, [[("calculator", {"expression": expr}, value)]],
                         self.rng.choice([f"{expr} = {value}.", f"The answer is {value}.", f"{q.rstrip('?.')}: {value}."]))

    def _doc(self) -> dict[str, Any]:
        f = self.fact()
        return self._run(self.tools(*self.standard()), f["q"], [[("file_search", {"query": f["query"]}, self.passages(f))]],
                         f["answer"])

    def _doc_calc(self) -> dict[str, Any]:
        f = self.fact()
        while "number" not in f:
            f = self.fact()
        if f["unit"] == "year":
            q = f"How many years ago was {f['name']} written, counting from 2026?"
            expr = f"2026 - {f['number']}"
            value = self._value(expr)
            answer = f"{f['name']} was written in {f['number']}, so {value} years ago."
        else:
            m = self.rng.randint(2, 12)
            q = f"Look up how many {f['unit']} {f['name']} uses, then multiply that by {m}."
            expr = f"{f['number']} * {m}"
            value = self._value(expr)
            answer = f"{f['name']} uses {f['number']} {f['unit']}; {f['number']} * {m} = {value}."
        return self._run(self.tools(*self.standard()), q, [[("file_search", {"query": f["query"]}, self.passages(f))],
                                                          [("calculator", {"expression": expr}, str(value))]], answer)

    def _parallel(self) -> dict[str, Any]:
        """A question on the documents and a calculation in one message: two calls in one turn, in the order asked."""
        f = self.fact()
        q1, expr, value = self.calc_task()
        calc_q = f"{q1[0].lower()}{q1[1:]}"
        join = self.rng.choice(["Also, ", "And ", "Then ", "Besides, "])
        search = ("file_search", {"query": f["query"]}, self.passages(f))
        calc = ("calculator", {"expression": expr}, value)
        if self.rng.random() < 0.3:
            q = f"{q1} {join}{f['q'][0].lower()}{f['q'][1:]}"
            return self._run(self.tools(*self.standard()), q, [[calc, search]], f"{expr} = {value}. {f['answer']}")
        return self._run(self.tools(*self.standard()), f"{f['q']} {join}{calc_q}", [[search, calc]],
                         f"{f['answer']} And {expr} = {value}.")

    def _triple(self) -> dict[str, Any]:
        """Two calculations and a look-up: three calls in one turn."""
        f = self.fact()
        (q1, e1, v1), (q2, e2, v2) = self.calc_task(), self.calc_task()
        q = f"{q1} {q2} And {f['q'][0].lower()}{f['q'][1:]}"
        return self._run(self.tools(*self.standard()), q, [[("calculator", {"expression": e1}, v1),
                                                           ("calculator", {"expression": e2}, v2),
                                                           ("file_search", {"query": f["query"]}, self.passages(f))]],
                         f"{e1} = {v1} and {e2} = {v2}. {f['answer']}")

    def _not_found(self) -> dict[str, Any]:
        """The passages do not hold the answer: say so, do not search again."""
        f = self.fact()
        others = "\n".join(f"[{i}] ({o['name'].lower()}.txt) {o['fact']} {self.rng.choice(FILLER)}"
                            for i, o in enumerate([self.fact() for _ in range(self.rng.randint(1, 3))], start=1))
        return self._run(self.tools(*self.standard()), f["q"], [[("file_search", {"query": f["query"]}, others)]],
                         self.rng.choice([f"The documents do not say anything about {f['name']}.",
                                          f"I could not find {f['name']} in the documents."]))

    def _date(self) -> dict[str, Any]:
        when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=self.rng.randint(0, 3 * 525600))
        result = f"{when.isoformat(timespec='seconds')} ({when.strftime('%A %d %B %Y, %H:%M')} UTC)"
        q = self.rng.choice(["What is the date today?", "What day of the week is it?", "What time is it now?"])
        answer = (f"Today is {when.strftime('%A %d %B %Y')}." if "time" not in q else f"It is {when.strftime('%H:%M')} UTC.")
        return self._run(self.tools(*self.standard()), q, [[("current_datetime", {}, result)]], answer)

    def _lookup(self) -> dict[str, Any]:
        server = self.rng.choice(["notes", "crm", "inventory", "demo", "registry", "kb"])
        noun, thing = self.rng.choice([("code", "word"), ("price", "product"), ("owner", "project"), ("status", "order"),
                                       ("capital", "country"), ("colour", "team")])
        name = f"{server}_get_{noun}"
        key = self.name()
        value = self.rng.choice([self.name().upper() + str(self.rng.randint(10, 99)), str(self.rng.randint(3, 900)),
                                 self.rng.choice(PEOPLE), self.rng.choice(["red", "green", "shipped", "pending", "open"])])
        spec = (name, f"The {noun} of a {thing}", {thing: S}, [thing])
        q = self.rng.choice([f"What is the {noun} of the {thing} {key}?", f"Find the {noun} for {thing} {key}.",
                             f"Use the {server} tool: what is the {noun} of {key}?"])
        tools = self.tools(_tool(spec), *(self.standard() if self.rng.random() < 0.5 else []))
        return self._run(tools, q, [[(name, {thing: key}, value)]], f"The {noun} of {key} is {value}.")

    def _chat(self) -> dict[str, Any]:
        q = self.rng.choice(CHAT)
        answer = self.chat_answer(q) if self.chat_answer else ""
        return self._run(self.tools(*self.standard()), q, [], answer)

    def _run(self, tools: list[dict[str, Any]], question: str, turns: list[list[tuple[str, dict[str, Any], str]]],
             answer: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        for turn in turns:
            calls = [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a, _ in turn]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            for call, (_, _, result) in zip(calls, turn, strict=True):
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        messages.append({"role": "assistant", "content": answer})
        return {"messages": messages, "tools": tools}


def render(fmt: ToolFormat, example: dict[str, Any]) -> dict[str, Any]:
    """The run as plain chat messages, in the model's tool format (what `lamina finetune sft` trains on)."""
    rendered, _ = fmt.messages(example["messages"], tools_from_openai(example["tools"]))
    return {"messages": rendered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--examples", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    a = parser.parse_args()
    from lamina.llm import LLM

    llm = LLM.load(a.model)
    answers: dict[str, str] = {}

    def chat_answer(q: str) -> str:
        if q not in answers:
            done = llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=120)
            answers[q] = done.text.strip() if done.finish_reason == "stop" else ""  # a cut answer would teach cutting
        return answers[q]

    gen = Generator(a.seed, chat_answer)
    rows = []
    for _ in range(a.examples):
        example = gen.example()
        if example["messages"][-1]["content"]:
            rows.append(render(llm.tool_format, example))
    a.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} examples -> {a.out}")


if __name__ == "__main__":
    main()
