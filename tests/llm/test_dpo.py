"""DPO: the loss by hand, reply-only log-probs, zero rewards at the start, held-out gains, exact resume, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from lamina import LLM
from lamina.arch import LlamaConfig, build_model
from lamina.arch.lora import LoRAConfig, apply_lora
from lamina.cli import cli
from lamina.foundation.tokenizer import Tokenizer
from lamina.llm.formats.peft import AdapterMismatchError, load_adapter, save_adapter, save_model_folder
from lamina.llm.tuning.base import TuneArgs, TuneRun
from lamina.llm.tuning.datasets import DatasetError, read_jsonl
from lamina.llm.tuning.dpo import (
    DPOArgs,
    EncodedPair,
    collate,
    dpo_loss,
    encode_pair,
    run_dpo,
    sequence_logps,
)
from lamina.settings import get_settings
from tests.tiny import CHAT_TEMPLATE, train_tokenizer

PREFS = Path(__file__).parents[1] / "data" / "prefs.jsonl"
LORA = LoRAConfig(r=8, alpha=16, target_modules="all-linear")


def tiny_folder(folder: Path, dim: int = 32, seed: int = 0, template: str | None = CHAT_TEMPLATE) -> Path:
    """A random tiny Llama with a ChatML tokenizer, saved as a Lamina model folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=400, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=2 * dim, max_seq_len=512)
    tokenizer = Tokenizer(train_tokenizer(400), bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return save_model_folder(folder, build_model(config), tokenizer, template, [2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("tiny-dpo") / "model")


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(folder: Path) -> LLM:
    return LLM.load(str(folder), device="cpu", dtype="float32")


def _records() -> list[dict]:
    return read_jsonl(PREFS, formats=("preference",))[1]


def _tune(**kw) -> TuneArgs:  # type: ignore[no-untyped-def]
    return TuneArgs(**{"max_steps": 40, "lr": 1e-3, "micro_batch_size": 8, "dtype": "float32", "eval_interval": 20, **kw})


def _run(folder: Path, **kw) -> TuneRun:  # type: ignore[no-untyped-def]
    return TuneRun(folder, get_settings().home, **kw)


# --- the pieces -----------------------------------------------------------------------------------------


def test_dpo_loss_matches_a_hand_computation() -> None:
    policy_c, policy_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_c, ref_r = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, stats = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)
    # pair 0: rewards 0.1 and -0.1, margin 0.2; pair 1: rewards 0 and 0.1, margin -0.1
    expected = (math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(0.1))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["chosen_rewards"].tolist() == pytest.approx([0.1, 0.0])
    assert stats["rejected_rewards"].tolist() == pytest.approx([-0.1, 0.1])
    assert stats["margins"].tolist() == pytest.approx([0.2, -0.1])
    assert stats["correct"].tolist() == [1.0, 0.0]


def test_log_probs_cover_the_reply_tokens_only_and_ignore_padding(tiny: Path) -> None:
    llm = _load(tiny)
    short = EncodedPair([5, 6, 7], [8, 9], [10])
    long = EncodedPair([5, 6, 7, 11, 12, 13, 14], [8, 9, 15, 16], [10, 17])
    with torch.no_grad():
        logits = llm.model(torch.tensor([[5, 6, 7, 8]]))[0].log_softmax(-1)  # prompt + chosen, last token not input
        by_hand = logits[2, 8] + logits[3, 9]  # positions 2 and 3 predict the reply tokens 8 and 9
        alone = sequence_logps(llm.model, collate([short]))
        padded = sequence_logps(llm.model, collate([short, long]))
    assert alone[0].item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5)  # chosen rows first
    assert padded[2].item() == pytest.approx(alone[1].item(), abs=1e-5)  # then rejected rows


def test_pairs_are_rendered_with_the_chat_template(tiny: Path, tmp_path: Path) -> None:
    llm = _load(tiny)
    pair = encode_pair(llm, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, 512)
    assert llm.tokenizer.decode(pair.prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenizer.decode(pair.chosen) == "Hello!<|im_end|>\n"
    as_messages = encode_pair(llm, {"prompt": [{"role": "user", "content": "Hi"}],
                                    "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."}, 512)
    assert as_messages == pair
    cut = encode_pair(llm, {"prompt": "Hi " * 50, "chosen": "Hello!", "rejected": "Go away."}, 24)
    assert len(cut.prompt) + max(len(cut.chosen), len(cut.rejected)) <= 24 and cut.chosen == pair.chosen
    plain = _load(tiny_folder(tmp_path / "base", template=None))
    pair = encode_pair(plain, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, 512)
    assert plain.tokenizer.decode(pair.chosen) == "Hello!<|im_end|>"  # the reply, then EOS
    with pytest.raises(DatasetError, match="no chat template"):
        encode_pair(plain, {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}, 512)


def test_a_line_missing_a_field_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DatasetError, match=r"prefs\.jsonl:2: missing field 'rejected'"):
        read_jsonl(path, formats=("preference",))


# --- training -------------------------------------------------------------------------------------------


def test_lora_dpo_starts_at_zero_rewards_and_gains_on_held_out_pairs(tiny: Path, tmp_path: Path) -> None:
    llm = _load(tiny)
    result = run_dpo(llm, _records(), DPOArgs(), _tune(), _run(tmp_path / "run"), lora=LORA)
    ref, final = result.reference, result.final
    assert (result.train_pairs, result.eval_pairs) == (120, 30)
    # before training the policy is the reference: every implicit reward is exactly 0
    assert ref["chosen_reward"] == 0.0 and ref["rejected_reward"] == 0.0 and ref["reward_margin"] == 0.0
    assert ref["reward_accuracy"] == 0.0 and ref["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert final["reward_accuracy"] > 0.6 and final["reward_margin"] > 0.2
    assert final["loss"] < ref["loss"] - 0.1
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_accuracy", "reward_margin", "eval_reward_accuracy"} <= set(history[-1])
    assert (tmp_path / "run" / "loss.png").exists()
    # the adapter loads onto its base, and DPO changed the model
    fresh = _load(tiny)
    ids = torch.tensor([encode_pair(fresh, _records()[0], 512).prompt])
    before = fresh.model(ids)
    load_adapter(fresh.model, result.output, base_model_id=llm.name)
    assert not torch.allclose(fresh.model(ids), before, atol=1e-4)


def test_full_dpo_needs_no_adapter_and_saves_a_servable_model(tiny: Path, tmp_path: Path) -> None:
    llm = _load(tiny)
    result = run_dpo(llm, _records(), DPOArgs(), _tune(max_steps=20, lr=3e-4), _run(tmp_path / "run"))
    assert result.reference["reward_margin"] == 0.0
    assert result.final["reward_accuracy"] > 0.5 and result.final["reward_margin"] > 0
    tuned = _load(result.output)
    assert tuned.chat_template is not None
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(tuned.model(ids), llm.model(ids), atol=1e-5)


def test_resume_continues_exactly(tiny: Path, tmp_path: Path) -> None:
    tune = _tune(max_steps=6, save_interval=3, eval_interval=6)
    run_dpo(_load(tiny), _records(), DPOArgs(), tune, _run(tmp_path / "whole"), lora=LORA)

    class Stop(Exception):
        pass

    def stop_at_4(record) -> None:  # type: ignore[no-untyped-def]
        if record.step == 4:  # after the step-3 checkpoint
            raise Stop

    with pytest.raises(Stop):
        run_dpo(_load(tiny), _records(), DPOArgs(), tune, _run(tmp_path / "cut", on_step=stop_at_4), lora=LORA)
    run_dpo(_load(tiny), _records(), DPOArgs(), tune, _run(tmp_path / "cut", resume=True), lora=LORA)

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    whole, cut = losses("whole"), losses("cut")
    assert len(whole) == len(cut) == 6
    assert cut == pytest.approx(whole, abs=1e-5)


# --- the command ----------------------------------------------------------------------------------------


def test_cli_trains_a_lora_adapter_and_reports_held_out_rewards(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "dpo", "--model", str(tiny), "--data", str(PREFS), "--lora", "--rank", "8",
                                      "--steps", "6", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "3",
                                      "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reward accuracy" in result.output and "reward margin" in result.output
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "dpo.json").exists()
    summary = json.loads((out / "dpo.json").read_text())
    assert summary["reference"]["reward_margin"] == 0.0 and summary["eval_pairs"] == 30
    again = CliRunner().invoke(cli, ["finetune", "dpo", "--model", str(tiny), "--data", str(PREFS), "--lora",
                                     "--steps", "6", "--dtype", "float32", "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_cli_names_the_bad_line_and_refuses_an_adapter_for_another_base(tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "rejected": "c"}\n')
    result = CliRunner().invoke(cli, ["finetune", "dpo", "--model", str(tiny), "--data", str(bad), "--lora"])
    assert result.exit_code == 2
    assert f"error: {bad}:3: missing field 'chosen'" in result.output
    other = _load(tiny_folder(tmp_path / "other", dim=48))
    apply_lora(other.model, LORA)
    save_adapter(other.model, tmp_path / "adapter", base_model_id="other")
    with pytest.raises(AdapterMismatchError):
        run_dpo(_load(tiny), _records(), DPOArgs(), _tune(max_steps=1), _run(tmp_path / "run"),
                adapter=tmp_path / "adapter")
    result = CliRunner().invoke(cli, ["finetune", "dpo", "--model", str(tiny), "--data", str(PREFS), "--lora",
                                      "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "was trained for" in result.output, result.output


def test_dpo_from_an_adapter_trains_it_further_against_the_model_with_it(tiny: Path, tmp_path: Path) -> None:
    start = _load(tiny)
    apply_lora(start.model, LORA)
    with torch.no_grad():  # a non-zero "SFT" adapter, so the reference differs from the bare base
        for name, p in start.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(start.model, tmp_path / "sft", base_model_id=start.name)
    llm = _load(tiny)
    result = run_dpo(llm, _records(), DPOArgs(), _tune(max_steps=10), _run(tmp_path / "run"), lora=LORA,
                     adapter=tmp_path / "sft")
    assert result.reference["reward_margin"] == 0.0  # the reference is base + SFT adapter, as training starts
    assert result.final["reward_margin"] > 0


def test_sequence_logps_agree_with_cross_entropy_over_a_batch(tiny: Path) -> None:
    llm = _load(tiny)
    pairs = [encode_pair(llm, r, 512) for r in _records()[:3]]
    batch = collate(pairs)
    with torch.no_grad():
        got = sequence_logps(llm.model, batch)
        for row in range(6):
            pair = pairs[row % 3]
            reply = pair.chosen if row < 3 else pair.rejected
            seq = torch.tensor([pair.prompt + reply])
            logp = -F.cross_entropy(llm.model(seq[:, :-1])[0], seq[0, 1:], reduction="none")
            assert got[row].item() == pytest.approx(logp[len(pair.prompt) - 1 :].sum().item(), rel=1e-6, abs=1e-4)  # (float32 sums in another order)
