"""Tool calling per chat-template family: Qwen2.5's and Llama 3.1's real templates (tests/data/templates, as llama.cpp
ships them) on tiny random models, and the built-in SmolLM2 format for a template without tools. With random
weights the model knows nothing, so every valid call it makes is the grammar's doing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

from lamina import LLM
from lamina.errors import InvalidRequestError
from lamina.llm.text.tools import (
    Hermes,
    Llama3Json,
    SmolLM2,
    ToolStream,
    tool_choice_from_openai,
    tools_from_openai,
)
from tests.tiny import hf_llama_folder

pytest.importorskip("transformers")

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}, "hour24": {"type": "boolean"}}, "required": ["tz"]}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: {**t["function"]["parameters"], "additionalProperties": False} for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}]


def _tiny(tmp_path_factory, kind: str, template: str | None) -> LLM:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    hf_llama_folder(folder, kind, max_position_embeddings=4096)
    if template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = (TEMPLATES / template).read_text()
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return LLM.load(str(folder), device="cpu", dtype="float32", home=folder / "home")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> LLM:  # type: ignore[no-untyped-def]
    return _tiny(tmp_path_factory, "qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja")


@pytest.fixture(scope="module")
def llama31(tmp_path_factory) -> LLM:  # type: ignore[no-untyped-def]
    return _tiny(tmp_path_factory, "llama", "meta-llama-Llama-3.1-8B-Instruct.jinja")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> LLM:  # type: ignore[no-untyped-def]
    return _tiny(tmp_path_factory, "llama", None)  # tests/tiny.py's ChatML template: roles and content only


def test_formats_are_detected_from_the_templates(qwen, llama31, chatml) -> None:
    assert (qwen.tool_format.name, llama31.tool_format.name, chatml.tool_format.name) == ("hermes", "llama3_json", "smollm2")


def test_history_renders_in_each_templates_own_format(qwen, llama31, chatml) -> None:
    def prompt(llm: LLM) -> str:
        return llm.tokenizer.decode(llm.encode_chat(HISTORY, tools=llm.tool_plan(TOOLS)))

    q = prompt(qwen)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in q  # the template's own tools block
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in q
    assert '<|im_start|>user\n<tool_response>\n{"temp": 18}\n</tool_response><|im_end|>' in q
    lm = prompt(llama31)
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}' in lm and "ipython" in lm
    c = prompt(chatml)
    assert "<tools>[" in c and '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]</tool_call>' in c
    assert "<tool_response>\n{\"temp\": 18}\n</tool_response>" in c


@pytest.mark.parametrize("family", ["qwen", "llama31", "chatml"])
def test_required_and_named_calls_always_validate(family, request) -> None:
    llm: LLM = request.getfixturevalue(family)
    for seed in range(6):  # one call allowed: the grammar ends the answer after it
        c = llm.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=900)
        assert c.finish_reason == "tool_calls" and len(c.tool_calls) == 1 and not c.text.strip(), (seed, c.text)
        jsonschema.validate(json.loads(c.tool_calls[0].arguments), SCHEMAS[c.tool_calls[0].name])
    for seed in range(3):
        c = llm.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=1.0,
                     seed=seed, max_tokens=900)
        assert c.finish_reason == "stop" and [t.name for t in c.tool_calls] == ["get_time"]
    if family != "llama31":  # (Llama 3.1's template takes one call per turn) parallel: calls until it stops or runs out
        c = llm.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0, max_tokens=900)
        assert c.tool_calls and c.finish_reason in ("tool_calls", "length")
        for call in c.tool_calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_auto_gives_text_or_valid_calls(qwen, chatml) -> None:
    for llm in (qwen, chatml):
        kinds = set()
        for seed in range(8):
            c = llm.chat(ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=40)
            for call in c.tool_calls:
                jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            assert "<tool_call>" not in c.text or c.finish_reason == "length"  # a started call is a call
            kinds.add("call" if c.tool_calls else "text")
        assert kinds  # (random weights: which kinds appear is chance; each was checked above)


STREAMS = [
    (Hermes(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"a": "}"}]}}\n'
               '</tool_call>\n<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>',
     "Let me check.\n", [("get_weather", '{"city": "Pa\\"ris}", "n": [1, {"a": "}"}]}'), ("t", "{}")]),
    (SmolLM2(), '<tool_call>[{"name": "a", "arguments": {"x": "q\\"}"}}, {"name": "c", "arguments": {"y": 1}}]</tool_call>',
     "", [("a", '{"x": "q\\"}"}'), ("c", '{"y": 1}')]),
    (Llama3Json(), '  {"name": "f", "parameters": {"k": true}}', "", [("f", '{"k": true}')]),
    (Llama3Json(), "Hello {x}", "Hello {x}", []),
    (Hermes(), "No call here <tool", "No call here <tool", []),
    (Hermes(), '<tool_call>\n{"name": "f"}\n</tool_call>', "", [("f", "{}")]),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), STREAMS, ids=[f"{s[0].name}-{i}" for i, s in enumerate(STREAMS)])
def test_stream_splits_content_and_calls_however_the_text_is_cut(fmt, text, content, calls) -> None:
    rng = random.Random(0)
    for _ in range(40):
        stream, got, names, args = ToolStream(fmt), "", {}, {}
        i = 0
        while i < len(text):
            n = rng.randint(1, 6)
            piece, deltas = stream.push(text[i : i + n])
            i += n
            got += piece
            for d in deltas:
                if d.name is not None:
                    assert d.index not in names and d.id.startswith("call_")
                    names[d.index] = d.name
                else:
                    assert d.index in names  # no fragment before its call's name
                args[d.index] = args.get(d.index, "") + d.arguments
        got += stream.finish()
        assert got == content
        assert [(names[k], args[k]) for k in sorted(names)] == calls == [(c.name, c.arguments) for c in stream.calls]


def test_tool_lists_and_choices_are_checked() -> None:
    with pytest.raises(InvalidRequestError, match="unique"):
        tools_from_openai([WEATHER, WEATHER])
    with pytest.raises(InvalidRequestError, match="at most 128"):
        tools_from_openai([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)])
    with pytest.raises(InvalidRequestError, match="1-64"):
        tools_from_openai([{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(InvalidRequestError, match="function tool"):
        tools_from_openai([{"type": "code_interpreter"}])
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        tools_from_openai([{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}])
    listed = tools_from_openai(TOOLS)
    assert tool_choice_from_openai(None, listed).mode == "auto" and tool_choice_from_openai(None, []).mode == "none"
    assert tool_choice_from_openai({"type": "function", "name": "get_time"}, listed).name == "get_time"  # Responses API shape
    with pytest.raises(InvalidRequestError, match="not among"):
        tool_choice_from_openai({"type": "function", "function": {"name": "nope"}}, listed)
    with pytest.raises(InvalidRequestError, match="needs tools"):
        tool_choice_from_openai("required", [])


def test_constraints_hold_under_a_lora_adapter(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    import torch

    hf = hf_llama_folder(tmp_path / "base", "llama", max_position_embeddings=4096)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero: randomise it, or the adapter would change nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "adapter")
    llm = LLM.load(str(tmp_path / "base"), device="cpu", dtype="float32", home=tmp_path / "home")
    llm.load_adapter("tuned", tmp_path / "adapter")
    for seed in range(3):
        c = llm.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=900,
                     adapter="tuned")
        assert c.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(c.tool_calls[0].arguments), SCHEMAS[c.tool_calls[0].name])
        base = llm.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=900)
        assert base.finish_reason == "tool_calls"
    llm.close()
