"""Structured outputs: JSON Schema, regex, choice and grammar constraints enforced while decoding (llguidance),
on the real SmolLM2 weights, through the engine's batching, n > 1, logprobs, prefix reuse and the Python API."""

from __future__ import annotations

import json

import jsonschema
import pydantic
import pytest

from lamina.errors import InvalidRequestError
from lamina.llm import SamplingParams
from lamina.llm.engine.core import Engine, EngineArgs
from lamina.llm.engine.grammar import Grammars, Matcher, StructuredOutput, closed
from lamina.llm.llm import structured_output

ASK = "Describe a person as JSON."

# Bounded schemas: every string, array and number has a limit, so each output ends well within max_tokens
# whatever the model prefers; validity is then what is tested, not what the model knows.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "null"}]}},
     "required": ["v"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"],
     "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                      "day": {"type": "string", "format": "date"}},
     "required": ["code", "day"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1, "maxItems": 4},
]


def _engine(llm, **args) -> Engine:  # type: ignore[no-untyped-def]
    c = llm.config
    return Engine(llm.model, eos_ids=[llm.tokenizer.eos_id], max_seq_len=c.max_seq_len, vocab_size=c.vocab_size,
                  args=EngineArgs(**args), grammars=llm.engine._engine.grammars)


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    out: dict[str, dict] = {rid: {"ids": [], "logprobs": [], "finish": None} for rid in requests}
    while engine.has_unfinished():
        for e in engine.step():
            r = out[e.request_id]
            if not e.is_stop_token:
                r["ids"].append(e.token_id)
            r["logprobs"].append(e.logprob)
            r["finish"] = e.finish_reason or r["finish"]
    return out


def _chat_ids(llm, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return llm.encode_chat([{"role": "user", "content": text}])


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_every_output_validates_greedy_and_sampled(smollm, schema) -> None:
    for params in (dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=1.3, top_p=0.95, seed=11)):
        c = smollm.chat([{"role": "user", "content": ASK}], response_format=schema, max_tokens=300, **params)
        assert c.finish_reason == "stop", (params, c.text)
        jsonschema.validate(json.loads(c.text), schema)


def test_choice_regex_and_grammar(smollm) -> None:
    c = smollm.chat([{"role": "user", "content": "Is Paris in France?"}], response_format=StructuredOutput("choice", ["yes", "no"]),
                    temperature=0)
    assert c.text in ("yes", "no") and c.finish_reason == "stop"
    c = smollm.chat([{"role": "user", "content": "Give a phone number."}],
                    response_format=StructuredOutput("regex", r"\+[0-9]{2} [0-9]{3}-[0-9]{4}"), temperature=1.0, seed=3)
    assert __import__("re").fullmatch(r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", c.text) and c.finish_reason == "stop"
    lark = 'start: "(" op " " num " " num ")"\nop: "+" | "-" | "*"\nnum: /[0-9]{1,3}/'
    c = smollm.chat([{"role": "user", "content": "A sum in Lisp."}], response_format=StructuredOutput("grammar", lark),
                    temperature=1.0, seed=5)
    assert __import__("re").fullmatch(r"\([+*-] [0-9]{1,3} [0-9]{1,3}\)", c.text), c.text
    gbnf = 'root ::= "SELECT " col " FROM t"\ncol ::= "a" | "b"'
    c = smollm.generate("SQL:", response_format=StructuredOutput("grammar", gbnf), temperature=0)
    assert c.text in ("SELECT a FROM t", "SELECT b FROM t")


def test_pydantic_model_is_parsed(smollm) -> None:
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)
        population: int = pydantic.Field(ge=0, le=10**9)

    c = smollm.chat([{"role": "user", "content": "The capital of France as JSON (name, country, population)."}],
                    response_format=City, temperature=0, max_tokens=200)
    assert isinstance(c.parsed, City) and c.parsed.name
    assert set(json.loads(c.text)) == {"name", "country", "population"}  # closed: no extra keys


def test_batched_constrained_requests_match_alone_and_leave_others_unchanged(smollm) -> None:
    schema = StructuredOutput("json_schema", SCHEMAS[0])
    ids = _chat_ids(smollm, ASK)
    plain_ids = _chat_ids(smollm, "Name three colours.")
    greedy = SamplingParams(max_tokens=80, temperature=0, structured=schema)
    plain = SamplingParams(max_tokens=24, temperature=0)
    sampled = SamplingParams(max_tokens=120, temperature=1.0, seed=1, structured=schema, logprobs=2)
    alone = _run(_engine(smollm, retained_caches=0), {"g": (ids, greedy)})["g"]
    plain_alone = _run(_engine(smollm, retained_caches=0), {"p": (plain_ids, plain)})["p"]
    together = _run(_engine(smollm, retained_caches=0), {
        "g": (ids, greedy), "p": (plain_ids, plain), "s1": (ids, sampled),
        "s2": (ids, SamplingParams(max_tokens=120, temperature=1.0, seed=2, structured=schema)),
    })
    assert together["g"]["ids"] == alone["ids"] and together["g"]["finish"] == "stop"
    assert together["p"]["ids"] == plain_alone["ids"]
    for rid in ("g", "s1", "s2"):
        jsonschema.validate(json.loads(smollm.tokenizer.decode(together[rid]["ids"])), SCHEMAS[0])
    assert all(lp is not None and lp <= 0 for lp in together["s1"]["logprobs"])


def test_constrained_after_a_prefix_cache_hit_and_with_drafts_on(smollm) -> None:
    schema = StructuredOutput("json_schema", SCHEMAS[4])
    ids = _chat_ids(smollm, ASK)
    params = SamplingParams(max_tokens=120, temperature=0, structured=schema, speculative_tokens=4)
    engine = _engine(smollm, retained_caches=4, speculative_tokens=4)
    first = _run(engine, {"a": (ids, params)})["a"]
    second = _run(engine, {"b": (ids, params)})["b"]  # the prompt's keys and values come from the first
    assert first["ids"] == second["ids"] and first["finish"] == "stop"
    jsonschema.validate(json.loads(smollm.tokenizer.decode(first["ids"])), SCHEMAS[4])


def test_a_complete_output_stops_without_an_end_token(smollm) -> None:
    params = SamplingParams(max_tokens=50, temperature=0, structured=StructuredOutput("choice", ["alpha", "beta"]))
    out = _run(_engine(smollm), {"c": (_chat_ids(smollm, "Pick one."), params)})["c"]
    assert smollm.tokenizer.decode(out["ids"]) in ("alpha", "beta") and out["finish"] == "stop"


def test_whitespace_between_tokens_is_bounded(smollm) -> None:
    grammars: Grammars = smollm.engine._engine.grammars
    tok = smollm.tokenizer
    allowed = []
    for gap in ("\n", "\n  ", " ", "\n\n\n", "   ", "\n" + " " * 24):
        m = grammars.matcher(StructuredOutput("json_object"))
        assert m.advance(tok.token_to_id("{"))
        allowed.append(all(m.advance(t) for t in tok.encode(gap + '"a', add_special_tokens=False)))
    assert allowed == [True, True, True, False, False, False]


@pytest.mark.parametrize(("kind", "value", "words"), [
    ("json_schema", {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}, ["uniqueItems", "#/properties/t"]),
    ("json_schema", {"type": "object", "properties": {"d": {"type": "string", "format": "no-such"}}}, ["format", "#/properties/d"]),
    ("json_schema", {"type": "strng"}, ["strng"]),
    ("json_schema", '{"type": "object"', ["not valid JSON"]),
    ("json_schema", {"properties": {"x": {"$ref": "#/$defs/missing"}}}, ["/$defs/missing"]),
    ("json_schema", [1, 2], ["object"]),
    ("regex", "(unclosed", ["regex"]),
    ("regex", "", ["non-empty"]),
    ("choice", [], ["choice"]),
    ("choice", ["ok", ""], ["non-empty"]),
    ("grammar", "start: undefined_rule", ["grammar"]),
    ("grammar", "root ::= (", ["GBNF"]),
    ("nonsense", None, ["unknown"]),
])
def test_what_cannot_be_enforced_is_refused(kind, value, words) -> None:
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutput(kind, value, param="response_format")  # type: ignore[arg-type]
    assert info.value.param == "response_format"
    for w in words:
        assert w in info.value.message, info.value.message


def test_an_engine_without_a_tokenizer_refuses_constraints(smollm) -> None:
    c = smollm.config
    engine = Engine(smollm.model, eos_ids=[2], max_seq_len=c.max_seq_len, vocab_size=c.vocab_size)
    with pytest.raises(InvalidRequestError, match="structured outputs"):
        engine.validate([1, 2, 3], SamplingParams(structured=StructuredOutput("json_object")))


def test_closed_and_response_format_spellings() -> None:
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {"type": "string"}}},
                                               "b": {"type": "array", "items": {"type": "object"}}},
              "$defs": {"d": {"type": "object", "additionalProperties": True}}}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # a property named "properties" is not a schema keyword's map
    assert out["properties"]["b"]["items"]["additionalProperties"] is False
    assert out["$defs"]["d"]["additionalProperties"] is True
    assert structured_output({"type": "text"}) is None
    assert structured_output({"type": "json_object"}).kind == "json_object"
    spec = structured_output({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}})
    assert spec.schema == {"type": "object", "additionalProperties": False}
    assert structured_output({"type": "object"}).kind == "json_schema"
    with pytest.raises(InvalidRequestError):
        structured_output(42)


def test_unbounded_numbers_are_held_to_the_exact_json_range(smollm) -> None:
    from lamina.llm.engine.grammar import SAFE_INTEGER, bounded_numbers

    schema = {"type": "object", "properties": {"n": {"type": ["integer", "null"]}, "x": {"type": "number", "minimum": 0},
                                               "k": {"enum": [1, 2]}, "m": {"type": "integer", "exclusiveMaximum": 10}}}
    out = bounded_numbers(schema)["properties"]
    assert (out["n"]["minimum"], out["n"]["maximum"]) == (-SAFE_INTEGER, SAFE_INTEGER)
    assert out["x"] == {"type": "number", "minimum": 0, "maximum": SAFE_INTEGER}
    assert out["k"] == {"enum": [1, 2]} and "maximum" not in out["m"]
    tok = smollm.tokenizer
    m = smollm.engine._engine.grammars.matcher(StructuredOutput("json_schema", {"type": "integer"}))
    assert all(m.advance(t) for t in tok.encode(str(SAFE_INTEGER), add_special_tokens=False))
    m = smollm.engine._engine.grammars.matcher(StructuredOutput("json_schema", {"type": "integer"}))
    assert not all(m.advance(t) for t in tok.encode("1" * 20, add_special_tokens=False))


@pytest.mark.parametrize("max_tokens", [12, 40])
def test_a_budget_that_runs_out_still_ends_in_valid_json(smollm, max_tokens: int) -> None:
    """Unbounded strings and arrays would be cut mid-value by max_tokens; in the budget's last tokens the grammar
    keeps to closing tokens, so the answer is complete JSON (reported as `length`: it was cut short)."""
    schema = {"type": "object", "properties": {"chapters": {"type": "array", "items": {"type": "string"}},
                                               "moral": {"type": "string"}}, "required": ["chapters"]}
    c = smollm.chat([{"role": "user", "content": "Write a very long story about a dragon, chapter by chapter, as JSON."}],
                    response_format=schema, max_tokens=max_tokens, temperature=0)
    jsonschema.validate(json.loads(c.text), schema)
    assert c.finish_reason == "length" and c.parsed is None and c.completion_tokens <= max_tokens
    free = smollm.chat([{"role": "user", "content": "Write a very long story about a dragon."}], max_tokens=max_tokens, temperature=0)
    assert free.finish_reason == "length"  # the same budget, unconstrained, is cut wherever it ends


def _drive(matcher, tok, favoured: list[int], steps: int, closing: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
    """`steps` greedy picks of a model that always prefers `favoured` (in that order) over every other token."""
    import torch

    picked = []
    for _ in range(steps):
        if matcher.done:
            break
        logits = torch.zeros(tok.vocab_size)
        for rank, t in enumerate(favoured):
            logits[t] = 10.0 - rank
        token = int(matcher.apply(logits, closing=closing).argmax())
        assert matcher.advance(token), tok.decode([token])
        picked.append(token)
    return picked


def test_a_string_that_loops_is_closed_and_a_repeated_array_is_left_alone(smollm) -> None:
    grammars, tok = smollm.engine._engine.grammars, smollm.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "array", "items": {"type": "integer"}}},
              "required": ["name", "n"], "additionalProperties": False}
    m = grammars.matcher(StructuredOutput("json_schema", schema))
    prefix = tok.encode('{"name": "', add_special_tokens=False)
    assert all(m.advance(t) for t in prefix)
    loop = tok.encode("_2023", add_special_tokens=False)
    picked = _drive(m, tok, loop, 60)  # the model wants "_2023" forever
    text = tok.decode(prefix + picked)
    assert '"' in text[len('{"name": "'):], text  # the string was closed once the loop was seen
    assert m.loops_broken == 1 and not m.closing
    assert text.count("_2023") <= Matcher.LOOP_TOKENS // len(loop) + 2, text
    # a loop of the same number in an array is data: nothing forces it to end
    m = grammars.matcher(StructuredOutput("json_schema", schema))
    assert all(m.advance(t) for t in tok.encode('{"name": "x", "n": [0', add_special_tokens=False))
    zeros = tok.encode(", 0", add_special_tokens=False)
    picked = _drive(m, tok, zeros, 80)
    assert picked == (zeros * 80)[:80] and m.loops_broken == 0


@pytest.mark.parametrize("closing", [False, True])
def test_a_looping_email_is_ended_by_the_shortest_valid_escape(smollm, closing: bool) -> None:
    """An email's local part cannot take the closing quote, and may hold `}` (which is text there, not a closer):
    the matcher finds the shortest run of one-byte tokens that lets the string close, and the object ends valid."""
    grammars, tok = smollm.engine._engine.grammars, smollm.tokenizer
    schema = {"type": "object", "properties": {"email": {"type": "string", "format": "email"}, "ok": {"type": "boolean"}},
              "required": ["email", "ok"], "additionalProperties": False}
    m = grammars.matcher(StructuredOutput("json_schema", schema))
    prefix = tok.encode('{"email": "example', add_special_tokens=False)
    assert all(m.advance(t) for t in prefix)
    loop = tok.encode(".example", add_special_tokens=False)
    brace = tok.encode("}", add_special_tokens=False)
    true = tok.encode(" true", add_special_tokens=False)
    picked = _drive(m, tok, loop + brace + true, 200, closing=closing)  # loops, else braces, else true
    text = tok.decode(prefix + picked)
    assert m.done, text
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    assert "@" in value["email"] and "}" not in value["email"], text
    assert m.closing == closing
