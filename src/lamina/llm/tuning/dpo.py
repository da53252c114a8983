"""Direct Preference Optimisation (DPO): tune a model to prefer the chosen reply of each pair to the rejected one.

DPO (Rafailov et al., 2023, eq. 7) needs no reward model and no sampling. For a prompt x with a chosen
reply y_w and a rejected one y_l, the implicit reward of a reply is how much more likely the policy makes
it than the reference does, r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), and the loss is

    loss = -log sigmoid(r(y_w) - r(y_l))        (the "sigmoid" loss; beta 0.1 as in the paper and TRL)

Log-probabilities are sums over the reply's tokens only (the prompt is given, not learned). The numbers to
watch, as TRL logs them: the reward margin r(y_w) - r(y_l) and the reward accuracy, the share of pairs with
r(y_w) > r(y_l). Before training the policy is the reference, so every reward is exactly 0 (accuracy 0,
margin 0, loss log 2); on a held-out split both should rise.

The reference is the model as training starts: with LoRA, the base with the adapters switched off
(`disable_adapters`); fully fine-tuned, the untouched weights. Its log-probs never change, so they are
computed once for every pair before the first step (TRL's `precompute_ref_log_probs`): a full fine-tune
needs no frozen second copy in memory, and a resumed run gets bit-identical references.

Prompts and replies are rendered with the model's chat template (a string prompt becomes one user
message, a string reply one assistant message, and the reply's tokens are what the full conversation adds
after the generation prompt, its end-of-turn token included); a model without a template sees plain text
with its EOS token after the reply.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.lora import (
    LoRAConfig,
    apply_lora,
    disable_adapters,
    lora_config,
    lora_layers,
    merge_lora,
    unload_lora,
)
from lamina.errors import ConfigError
from lamina.infra.fs import atomic_write_text
from lamina.llm.formats.peft import load_adapter, save_adapter, save_model_folder
from lamina.llm.llm import LLM
from lamina.llm.tuning.base import TuneArgs, TuneLoop, TuneResult, TuneRun, held_out_split, score_then_train
from lamina.llm.tuning.datasets import DatasetError, batch_indices

logger = logging.getLogger(__name__)


@dataclass
class DPOArgs:
    beta: float = 0.1  # how far the policy may move from the reference: smaller lets it move further
    max_len: int = 512  # prompt + reply tokens; longer pairs lose prompt tokens from the left, then reply tokens
    eval_fraction: float = 0.2  # the held-out share of the pairs
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}; 0.1 is usual", param="beta")
        if self.max_len < 8:
            raise ConfigError(f"max_len must be at least 8 tokens, got {self.max_len}", param="max_len")


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class DPOResult:
    reference: dict[str, float]  # held-out metrics before training (the reference against itself)
    final: dict[str, float]  # held-out metrics after training
    tune: TuneResult
    output: Path  # the adapter folder (LoRA) or model folder (full)
    train_pairs: int
    eval_pairs: int
    seconds: float


# --- data ------------------------------------------------------------------------------------------------


def encode_pair(llm: LLM, record: dict[str, Any], max_len: int, where: str = "record") -> EncodedPair:
    """Token ids of one preference record: the prompt (generation prompt included) and the two replies."""
    prompt = _encode_prompt(llm, record["prompt"], where)
    chosen = _encode_reply(llm, record["prompt"], record["chosen"], prompt, f"{where}: field 'chosen'")
    rejected = _encode_reply(llm, record["prompt"], record["rejected"], prompt, f"{where}: field 'rejected'")
    return _fit(EncodedPair(prompt, chosen, rejected), min(max_len, llm.config.max_seq_len))


def _messages(value: str | list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _encode_prompt(llm: LLM, prompt: str | list[dict[str, Any]], where: str) -> list[int]:
    if llm.chat_template is not None:
        return llm.chat_template.encode(_messages(prompt, "user"), add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: field 'prompt' is a list of messages, but model {llm.name!r} has no chat "
                           "template; give plain-text prompts", param="data")
    ids = llm.tokenizer.encode(prompt)
    if not ids:  # the first reply token needs something to follow
        raise DatasetError(f"{where}: field 'prompt' is empty", param="data")
    return ids


def _encode_reply(llm: LLM, prompt: str | list[dict[str, Any]], reply: str | list[dict[str, Any]],
                  prompt_ids: list[int], where: str) -> list[int]:
    if llm.chat_template is None:
        if not isinstance(reply, str):
            raise DatasetError(f"{where} is a list of messages, but model {llm.name!r} has no chat template",
                               param="data")
        eos = llm.tokenizer.eos_id if llm.tokenizer.eos_id is not None else min(llm.engine.eos_ids)
        return [*llm.tokenizer.encode(reply, add_special_tokens=False), eos]
    conversation = _messages(prompt, "user") + _messages(reply, "assistant")
    full = llm.chat_template.encode(conversation, add_generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise DatasetError(f"{where}: the chat template renders the prompt differently once a reply follows, so the "
                           "reply's tokens cannot be told apart; give the reply as assistant messages", param="data")
    if len(full) == len(prompt_ids):
        raise DatasetError(f"{where} adds no tokens to the conversation (an empty reply?)", param="data")
    return full[len(prompt_ids):]


def _fit(pair: EncodedPair, max_len: int) -> EncodedPair:
    """Cut a pair to max_len tokens: the prompt's start goes first (its end matters most), then the replies' ends."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= max_len:
        return pair
    room = max_len - min(len(pair.prompt), max_len // 2)  # the replies keep at least half unless the prompt is short
    chosen, rejected = pair.chosen[:room], pair.rejected[:room]
    keep = max_len - max(len(chosen), len(rejected))
    return EncodedPair(pair.prompt[-keep:], chosen, rejected)


@dataclass
class PairBatch:
    """B pairs as 2B rows, chosen rows first: inputs and targets (2B, T), `mask` 1 on reply targets."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def collate(pairs: Sequence[EncodedPair], device: torch.device | str = "cpu", pad_id: int = 0) -> PairBatch:
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(prompt) + len(reply) for prompt, reply in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for i, (prompt, reply) in enumerate(rows):
        seq = torch.tensor(prompt + reply)
        n = len(seq) - 1
        inputs[i, :n], targets[i, :n] = seq[:-1], seq[1:]
        mask[i, len(prompt) - 1 : n] = 1.0  # the positions that predict reply tokens
    return PairBatch(inputs.to(device), targets.to(device), mask.to(device))


# --- the loss --------------------------------------------------------------------------------------------


def sequence_logps(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """(2B,) float32: each row's summed log-probability of its reply tokens."""
    # right padding cannot leak backwards through causal attention; the head runs at the reply positions only
    scored = batch.mask > 0
    logits = model(batch.inputs, logits_at=scored)  # (n, V)
    token_logps = -F.cross_entropy(logits.float(), batch.targets[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    weights = batch.mask[scored]
    return torch.zeros(batch.mask.shape[0], device=token_logps.device).index_add(0, rows, token_logps * weights)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sigmoid DPO loss (mean over pairs) and per-pair statistics, all (B,) but the loss."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)
    stats = {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
             "margins": margins, "correct": (margins > 0).float(),
             "policy_prefers": (policy_chosen > policy_rejected).float(),
             "reference_prefers": (ref_chosen > ref_rejected).float()}
    return losses.mean(), stats


def summarise(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged figures: means over pairs of what `dpo_loss` returns."""
    return {
        "loss": stats["losses"].mean().item(),
        "reward_accuracy": stats["correct"].mean().item(),
        "reward_margin": stats["margins"].mean().item(),
        "chosen_reward": stats["chosen_rewards"].mean().item(),
        "rejected_reward": stats["rejected_rewards"].mean().item(),
        # not DPO's rewards: whether the model itself (and the reference) rates the chosen reply likelier
        "policy_prefers_chosen": stats["policy_prefers"].mean().item(),
        "reference_prefers_chosen": stats["reference_prefers"].mean().item(),
    }


# --- training --------------------------------------------------------------------------------------------


class _DPO:
    """The pieces TuneLoop calls: batches by (step, micro), the loss, and the held-out evaluation."""

    def __init__(self, model: nn.Module, train: list[EncodedPair], held: list[EncodedPair], args: DPOArgs,
                 tune: TuneArgs, pad_id: int) -> None:
        self.model, self.train, self.held, self.args, self.tune, self.pad_id = model, train, held, args, tune, pad_id
        self.device = next(model.parameters()).device
        self.ref_train = torch.zeros(len(train), 2)
        self.ref_held = torch.zeros(len(held), 2)

    def chunks(self, pairs: list[EncodedPair]) -> list[list[int]]:
        """Fixed chunks in file order: the reference and every evaluation see the very same batches."""
        size = self.tune.micro_batch_size
        return [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)]

    def logps(self, pairs: list[EncodedPair], index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = sequence_logps(self.model, collate([pairs[i] for i in index], self.device, self.pad_id))
        return out[: len(index)], out[len(index):]

    @torch.no_grad()
    def compute_reference(self, autocast: Any, adapters_off: bool) -> None:
        was_training = self.model.training
        self.model.eval()
        with autocast, disable_adapters(self.model) if adapters_off else nullcontext():
            for pairs, table in ((self.train, self.ref_train), (self.held, self.ref_held)):
                for index in self.chunks(pairs):
                    chosen, rejected = self.logps(pairs, index)
                    table[index] = torch.stack([chosen, rejected], dim=1).float().cpu()
        self.model.train(was_training)

    def batch(self, step: int, micro: int) -> list[int]:
        return batch_indices(len(self.train), step, micro, self.tune.micro_batch_size, self.tune.grad_accum,
                             self.tune.seed)

    def loss(self, index: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.logps(self.train, index)
        ref = self.ref_train[index].to(self.device)
        loss, stats = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.args.beta)
        return loss, {k: v for k, v in summarise(stats).items() if k != "loss"}

    def evaluate(self) -> dict[str, float]:
        parts: dict[str, list[torch.Tensor]] = {}
        for index in self.chunks(self.held):
            chosen, rejected = self.logps(self.held, index)
            ref = self.ref_held[index].to(self.device)
            _, stats = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.args.beta)
            for k, v in stats.items():
                parts.setdefault(k, []).append(v.float().cpu())
        return summarise({k: torch.cat(v) for k, v in parts.items()})


def run_dpo(
    llm: LLM,
    records: list[dict[str, Any]],
    args: DPOArgs,
    tune: TuneArgs,
    run: TuneRun,
    *,
    lora: LoRAConfig | None = None,
    adapter: Path | None = None,
) -> DPOResult:
    """DPO-tune `llm.model` in place on preference `records`; writes the adapter (LoRA) or model folder to run.run_dir.

    lora: train a new LoRA adapter (the base stays frozen), else every weight. adapter: start from this PEFT
    adapter (an SFT run's, for the same base: another base is refused); with `lora` it is the adapter trained
    further, without, it is merged into the weights first. Either way the reference is the model as it starts.
    """
    t0 = time.perf_counter()
    model, run_dir = llm.model, run.run_dir
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError(f"the model is in {next(model.parameters()).dtype}: load it in float32 for training "
                          "(autocast still runs the matmuls in a faster dtype)", param="dtype")
    if lora_layers(model):
        raise ConfigError("the model already carries LoRA adapters; pass a fresh model "
                          "(and an adapter to start from as adapter=)")
    train_records, held_records = held_out_split(records, args.eval_fraction, args.split_seed, "DPO")
    run.stage(f"encoding {len(records)} pairs")
    number = {id(r): i + 1 for i, r in enumerate(records)}
    train, held = ([encode_pair(llm, r, args.max_len, f"record {number[id(r)]}") for r in part]
                   for part in (train_records, held_records))
    if adapter is not None:
        load_adapter(model, adapter, adapter_name="default", base_model_id=llm.name)
        if lora is None:
            merge_lora(model)
            unload_lora(model)
    if lora is not None and adapter is None:
        torch.manual_seed(tune.seed)  # lora_A's random start: the same run twice is the same run
        apply_lora(model, lora)
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
    # else: apply_lora/load_adapter left only the adapter trainable
    pad_id = llm.tokenizer.eos_id if llm.tokenizer.eos_id is not None else 0
    dpo = _DPO(model, train, held, args, tune, pad_id)
    loop = TuneLoop(model, tune, run_dir, batch=dpo.batch, loss=dpo.loss, evaluate=dpo.evaluate,
                    title=f"DPO of {llm.name} (beta {args.beta})", on_step=run.on_step, cache_dir=run.cache_dir)
    run.stage("reference log-probs")
    dpo.compute_reference(loop.autocast(), adapters_off=lora is not None and adapter is None)
    # the policy is still the reference: every reward is 0
    reference, result = score_then_train(loop, dpo.evaluate, run, "held-out reference")
    final = result.eval
    model.requires_grad_(False)
    if lora is not None:
        output = save_adapter(model, run_dir / "adapter", base_model_id=llm.name)
    else:
        template = llm.chat_template.source if llm.chat_template is not None else None
        output = save_model_folder(run_dir / "model", model, llm.tokenizer, template, sorted(llm.engine.eos_ids))
    used = lora_config(model).to_dict() if lora is not None else None  # an adapter started from keeps its own
    summary = {"model": llm.name, "args": asdict(args), "tune": asdict(tune), "lora": used,
               "start_adapter": str(adapter) if adapter else None, "train_pairs": len(train),
               "eval_pairs": len(held), "reference": reference, "final": final, "output": str(output)}
    atomic_write_text(run_dir / "dpo.json", json.dumps(summary, indent=2))
    return DPOResult(reference, final, result, output, len(train), len(held), time.perf_counter() - t0)
