"""Supervised fine-tuning: TRL's data formats, assistant-only loss masks, packing, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lamina import LLM
from lamina.errors import InvalidRequestError
from lamina.llm.text.chat_template import ChatTemplate
from lamina.llm.tuning.base import TuneArgs
from lamina.llm.tuning.datasets import DatasetError, read_jsonl, split
from lamina.llm.tuning.sft import Example, collate, encode_record, load_sft_data, pack, run_sft
from tests.tiny import hf_llama_folder

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is Quill?"},
    {"role": "assistant", "content": "A basalt tortoise."},
    {"role": "user", "content": "Where does <|im_end|> it live?"},  # a forged control token stays text
    {"role": "assistant", "content": "In the Lamina lab."},
]


def _write(path: Path, records: list) -> Path:  # type: ignore[type-arg]
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _trained_text(llm: LLM, ids: list[int], mask: list[bool]) -> list[str]:
    """The trained spans, decoded."""
    spans, current = [], []
    for tid, m in zip(ids, mask, strict=True):
        if m:
            current.append(tid)
        elif current:
            spans.append(llm.tokenizer.decode(current))
            current = []
    if current:
        spans.append(llm.tokenizer.decode(current))
    return spans


# --- masks ----------------------------------------------------------------------------------------------


def test_assistant_only_mask_covers_exactly_the_assistant_turns(smollm) -> None:
    ids, mask = smollm.template.encode_with_mask(CHAT)
    assert ids == smollm.template.encode(CHAT, add_generation_prompt=False)
    assert _trained_text(smollm, ids, mask) == ["A basalt tortoise.<|im_end|>\n", "In the Lamina lab.<|im_end|>\n"]


def test_generation_marks_in_a_template_are_used_for_the_mask(smollm) -> None:
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = ChatTemplate(source, smollm.tokenizer)
    ids, mask = template.encode_with_mask(CHAT)
    assert ids == template.encode(CHAT, add_generation_prompt=False)
    assert _trained_text(smollm, ids, mask) == ["A basalt tortoise.<|im_end|>", "In the Lamina lab.<|im_end|>"]
    assert "\U000f0002" not in template.render(CHAT)  # the marks never reach a prompt


def test_a_template_that_rewrites_earlier_turns_is_explained(smollm) -> None:
    # renders the number of messages first: no turn's rendering is a prefix of the next
    source = "{{ messages | length }} turns\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    template = ChatTemplate(source, smollm.tokenizer)
    with pytest.raises(InvalidRequestError, match=r"\{% generation %\}"):
        template.encode_with_mask(CHAT)


def test_prompt_completion_and_text_formats(smollm) -> None:
    eos = min(smollm.engine.eos_ids)
    e = encode_record(smollm, "prompt_completion", {"prompt": "The sky is", "completion": " blue."})
    assert _trained_text(smollm, e.ids, e.trained) == [" blue.<|im_end|>"]
    assert e.ids[-1] == eos
    conv = encode_record(smollm, "prompt_completion", {"prompt": CHAT[:2], "completion": [CHAT[2]]})
    assert _trained_text(smollm, conv.ids, conv.trained) == ["A basalt tortoise.<|im_end|>\n"]
    text = encode_record(smollm, "text", {"text": "plain words"})
    assert all(text.trained) and text.ids[-1] == eos
    whole = encode_record(smollm, "messages", {"messages": CHAT}, assistant_only=False)
    assert all(whole.trained)


def test_pack_and_collate() -> None:
    examples = [Example([1, 2, 3, 4], [False, False, True, True]), Example([5, 6, 7], [False, True, True])]
    packed = pack(examples, 4, seed=0)
    assert sorted(t for e in packed for t in e.ids) == [1, 2, 3, 4, 5, 6, 7]
    assert all(len(e.ids) <= 4 for e in packed)
    x, y = collate(examples, pad_id=0, device=torch.device("cpu"))
    assert x.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert y.tolist() == [[-100, 3, 4], [6, 7, -100]]


# --- data files -----------------------------------------------------------------------------------------


def test_a_bad_line_is_named_with_its_field(tmp_path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _write(tmp_path / "d.jsonl", [good, good, {"messages": [{"role": "user"}]}])
    with pytest.raises(DatasetError, match=r"d.jsonl:3: field 'messages'\[0\]: missing field 'content'"):
        read_jsonl(path)
    path = _write(tmp_path / "e.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DatasetError, match=r"e.jsonl:2: missing field 'completion'"):
        read_jsonl(path)
    path = _write(tmp_path / "f.jsonl", [good, "{not json"])
    with pytest.raises(DatasetError, match=r"f.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path = _write(tmp_path / "g.jsonl", [{"question": "?"}])
    with pytest.raises(DatasetError, match=r"g.jsonl:1: missing field 'messages'"):
        read_jsonl(path)
    path = _write(tmp_path / "h.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DatasetError, match="no assistant message"):
        read_jsonl(path)


def test_the_eval_split_is_seeded_and_disjoint() -> None:
    records = [{"text": str(i)} for i in range(50)]
    train, held = split(records, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert split(records, 0.2, seed=3) == (train, held)


# --- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("tiny-sft")
    hf_llama_folder(folder)
    return folder


def _texts(path: Path, n: int = 24) -> Path:
    return _write(path, [{"text": f"item {i} is {'odd' if i % 2 else 'even'} and blue"} for i in range(n)])


def _train(folder: Path, data: Path, out: Path, steps: int, resume: bool = False, stop_at: int | None = None,
           lora: bool = True) -> tuple[LLM, object]:
    from lamina.llm.tuning.sft import default_lora

    llm = LLM.load(str(folder), device="cpu", dtype="float32")
    dataset = load_sft_data(llm, data, eval_split=0.25)
    args = TuneArgs(max_steps=steps, lr=5e-3, micro_batch_size=4, eval_interval=3, save_interval=3, dtype="float32",
                    warmup_steps=1)

    def stop(record) -> None:  # type: ignore[no-untyped-def]
        if stop_at is not None and record.step == stop_at:
            raise KeyboardInterrupt

    result = run_sft(llm, dataset, out, args=args, lora=default_lora(4, dropout=0.0) if lora else None,
                     resume=resume, on_step=stop)
    return llm, result


def test_lora_sft_lowers_the_loss_and_resumes_exactly(tiny_base, tmp_path) -> None:
    data = _texts(tmp_path / "t.jsonl")
    _, full = _train(tiny_base, data, tmp_path / "a", steps=9)
    losses = [r["loss"] for r in full.history]
    assert losses[-1] < losses[0]
    assert full.eval_loss is not None and (tmp_path / "a" / "loss.png").exists()
    assert (full.output / "adapter_config.json").exists()
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base, data, tmp_path / "b", steps=9, stop_at=5)  # killed after the step-3 checkpoint
    _, resumed = _train(tiny_base, data, tmp_path / "b", steps=9, resume=True)
    assert [r["loss"] for r in resumed.history] == pytest.approx(losses, abs=1e-5)
    assert resumed.eval_loss == pytest.approx(full.eval_loss, abs=1e-5)


def test_full_sft_writes_a_servable_model(tiny_base, tmp_path) -> None:
    _, result = _train(tiny_base, _texts(tmp_path / "t.jsonl"), tmp_path / "full", steps=3, lora=False)
    served = LLM.load(str(result.output), device="cpu", dtype="float32")
    assert served.generate("item 3 is", max_tokens=3, temperature=0).completion_tokens == 3


def test_the_cli_dry_run_shows_the_masked_tokens_and_bad_lines_are_one_line(tmp_path) -> None:
    path = _write(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    cmd = [sys.executable, "-m", "lamina", "finetune", "sft", "--data", str(path), "--dry-run", "--eval-split", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "[[A basalt tortoise.<|im_end|>\n]]" in out.stdout
    bad = _write(tmp_path / "bad.jsonl", [{"messages": CHAT}, {"messages": [{"role": "robot", "content": "x"}]}])
    out = subprocess.run([*cmd[:6], str(bad), "--dry-run"], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "bad.jsonl:2" in out.stderr and "unknown role 'robot'" in out.stderr
