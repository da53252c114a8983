"""Writes prefs.jsonl: a small preference set for `lamina finetune dpo`, built from facts that can be checked.

Every pair asks a question whose answer is known here (capitals, arithmetic and Python expressions that
this script evaluates, unit conversions). The chosen reply answers correctly and briefly. The rejected
reply fails in one of three ways, a third of the pairs each, in random order: a confident wrong answer,
an evasive non-answer, or a long reply that never answers.

    python tests/data/make_prefs.py   # rewrites tests/data/prefs.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (country, capital, a large city that is not the capital: the usual wrong answer)
CAPITALS = [
    ("France", "Paris", "Lyon"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"), ("Portugal", "Lisbon", "Porto"), ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"), ("India", "New Delhi", "Mumbai"), ("Australia", "Canberra", "Sydney"),
    ("Canada", "Ottawa", "Toronto"), ("Brazil", "Brasília", "Rio de Janeiro"), ("Turkey", "Ankara", "Istanbul"),
    ("Switzerland", "Bern", "Zurich"), ("the Netherlands", "Amsterdam", "Rotterdam"), ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"), ("Nigeria", "Abuja", "Lagos"), ("Russia", "Moscow", "Saint Petersburg"),
    ("Poland", "Warsaw", "Kraków"), ("Sweden", "Stockholm", "Gothenburg"), ("Norway", "Oslo", "Bergen"),
    ("Finland", "Helsinki", "Tampere"), ("Denmark", "Copenhagen", "Aarhus"), ("Greece", "Athens", "Thessaloniki"),
    ("Austria", "Vienna", "Salzburg"), ("Belgium", "Brussels", "Antwerp"), ("Ireland", "Dublin", "Cork"),
    ("Mexico", "Mexico City", "Guadalajara"), ("Argentina", "Buenos Aires", "Córdoba"), ("Chile", "Santiago", "Valparaíso"),
    ("Peru", "Lima", "Cusco"), ("Colombia", "Bogotá", "Medellín"), ("Morocco", "Rabat", "Casablanca"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"), ("Thailand", "Bangkok", "Chiang Mai"), ("South Korea", "Seoul", "Busan"),
    ("Pakistan", "Islamabad", "Karachi"), ("New Zealand", "Wellington", "Auckland"),
    ("the United States", "Washington, D.C.", "New York City"), ("the Czech Republic", "Prague", "Brno"),
    ("Hungary", "Budapest", "Debrecen"), ("Iran", "Tehran", "Isfahan"), ("Saudi Arabia", "Riyadh", "Jeddah"),
    ("Ukraine", "Kyiv", "Lviv"), ("Romania", "Bucharest", "Cluj-Napoca"), ("Cuba", "Havana", "Santiago de Cuba"),
    ("the Philippines", "Manila", "Cebu City"), ("Ethiopia", "Addis Ababa", "Dire Dawa"), ("Ghana", "Accra", "Kumasi"),
    ("Iceland", "Reykjavík", "Akureyri"),
]

# Python expressions, each with a plausible wrong value (what a hurried reader might expect).
PYTHON = [
    ('len("banana")', "5"), ("sorted([3, 1, 2])", "[3, 2, 1]"), ('"a,b,c".split(",")', "['a b c']"),
    ("2 ** 10", "1000"), ("7 // 2", "3.5"), ("7 % 3", "2"), ('"Hello".upper()', "'hello'"),
    ("list(range(3))", "[1, 2, 3]"), ('"abc"[::-1]', "'abc'"), ("max([4, 9, 2])", "4"), ("bool([])", "True"),
    ('int("42") + 1', "'421'"), ("abs(-7)", "-7"), ("round(3.7)", "3"), ('"-".join(["x", "y", "z"])', "'xyz'"),
    ("sum([1, 2, 3, 4])", "24"), ("len([[1, 2], [3]])", "3"), ('"hello"[1]', "'h'"), ("[1, 2, 3][-1]", "1"),
    ("min('cab')", "'c'"), ("3 * 'ab'", "'ab3'"), ("10 / 4", "2"), ("divmod(17, 5)", "(5, 2)"),
    ('"  pad  ".strip()', "'pad  '"), ("type(3.0).__name__", "'int'"), ("[x * x for x in range(4)]", "[1, 4, 9, 16]"),
    ("{1, 2, 2, 3}", "{1, 2, 2, 3}"), ('"mississippi".count("s")', "2"), ("1 == 1.0", "False"), ("not 0", "False"),
    ('"Python"[:2]', "'Pyt'"), ("len({'a': 1, 'b': 2})", "4"), ('"x".isdigit()', "True"), ("int(7.9)", "8"),
    ("list(zip([1, 2], 'ab'))", "[(1, 2), ('a', 'b')]"), ("[1, 2] + [3]", "[4, 5]"), ('"Hi" * 0', "'Hi'"),
    ("any([0, '', None])", "True"), ("all([])", "False"), ("hex(255)", "'ff'"),
]

# (unit asked for, factor, unit given) for whole-number conversions
UNITS = [
    ("centimetres", 100, "metres"), ("minutes", 60, "hours"), ("seconds", 60, "minutes"),
    ("grams", 1000, "kilograms"), ("millimetres", 10, "centimetres"), ("hours", 24, "days"),
]

EVASIVE = [
    "I'm sorry, but I can't help with that question.",
    "I don't know. You could try searching online for the answer.",
    "That is not something I am able to answer. Please ask someone else.",
    "I would rather not answer that. Is there anything else you need?",
]

RAMBLING = [
    "That's a really interesting question, and people have thought about questions like this for a long time. "
    "There are many different factors to consider, and the answer can depend a lot on the context and on what "
    "exactly you mean. It is always a good idea to look into things like this carefully and from several angles.",
    "Great question! Before answering, it helps to think about why we ask questions like this at all. Knowledge "
    "is something that grows over time, and everyone learns at their own pace. There are many resources out "
    "there, and exploring them can be a rewarding journey in itself.",
    "Well, there are a lot of ways to look at this. Some people would say one thing and others would say "
    "something else, and both sides have their reasons. In the end it really comes down to your own point of "
    "view and what matters most to you in your situation.",
]


def build(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    items: list[tuple[str, str, str]] = []  # (prompt, correct reply, wrong-answer reply)
    for country, capital, other in CAPITALS:
        items.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                      f"The capital of {country} is {other}."))
    for expr, wrong in PYTHON:
        value = repr(eval(expr))  # the literal expressions above, nothing read from outside
        assert value != wrong, expr
        items.append((f"What does the Python expression `{expr}` evaluate to?", f"`{expr}` evaluates to `{value}`.",
                      f"`{expr}` evaluates to `{wrong}`."))
    for _ in range(36):
        a, b, op = rng.randint(11, 99), rng.randint(2, 49), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
        sign = {"*": "×", "+": "+", "-": "-"}[op]
        items.append((f"What is {a} {sign} {b}?", f"{a} {sign} {b} = {value}.", f"{a} {sign} {b} = {wrong}."))
    for unit, factor, given in UNITS:
        for n in rng.sample(range(2, 13), 4):
            value = n * factor
            wrong = value + rng.choice([-factor, factor, factor * 9])
            items.append((f"How many {unit} are in {n} {given}?", f"There are {value} {unit} in {n} {given}.",
                           f"There are {wrong} {unit} in {n} {given}."))
    kinds = [i % 3 for i in range(len(items))]  # a third of each failure, in random order
    rng.shuffle(kinds)
    records = []
    for (prompt, chosen, wrong), kind in zip(items, kinds, strict=True):
        rejected = wrong if kind == 0 else rng.choice(EVASIVE) if kind == 1 else rng.choice(RAMBLING)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def main() -> None:
    path = Path(__file__).with_name("prefs.jsonl")
    records = build()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{path}: {len(records)} pairs")


if __name__ == "__main__":
    main()
