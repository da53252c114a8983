"""Speculative decoding by prompt lookup: the drafts, and greedy output identical to plain decoding."""

from __future__ import annotations

import pytest
import torch

from lamina.arch.llama import Llama, LlamaConfig
from lamina.errors import InvalidRequestError
from lamina.llm import SamplingParams
from lamina.llm.engine.core import Engine, EngineArgs
from lamina.llm.engine.speculative import propose
from lamina.llm.kernels import native
from lamina.llm.kernels.linear import Kernel, replace_linears


def test_the_draft_follows_the_latest_occurrence_of_the_longest_suffix() -> None:
    #          0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    assert propose(tokens, 3) == [1, 2, 6]  # "6 7" last seen at 5..6, followed by 1 2 6
    assert propose(tokens, 2, max_n=3, min_n=2) == [1, 2]  # k caps the draft
    assert propose([1, 2, 3, 9, 2, 3], 4) == [9, 2, 3]  # "2 3" at 1..2: what followed it, to the end
    assert propose([4, 8, 1, 2, 3, 5, 1, 2, 3], 2, max_n=3) == [5, 1]  # the 3-gram wins over shorter ones
    assert propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert propose([1, 2, 3, 1], 4, min_n=2) == [] and propose([1, 2, 3, 1], 4, min_n=1) == [2, 3, 1]
    assert propose([7], 4) == [] and propose([1, 1], 0) == []


def test_speculative_tokens_are_checked() -> None:
    with pytest.raises(InvalidRequestError, match="speculative_tokens must be in"):
        SamplingParams(speculative_tokens=17)
    with pytest.raises(InvalidRequestError, match="speculative_tokens must be in"):
        SamplingParams(speculative_tokens=-1)


def _model(mode: str, tmp_path) -> Llama:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=256)).eval()
    replace_linears(model, Kernel(mode, torch.float32, "native"), Kernel("int8", torch.float32, "native"), tmp_path)  # type: ignore[arg-type]
    return model


def _run(engine: Engine, prompts: dict[str, list[int]], params: dict[str, SamplingParams]) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params[rid])
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append(event.token_id)
    return out


@pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"native kernels: {native.unavailable_reason()}")
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_greedy_output_is_the_same_with_drafts_alone_and_in_a_batch(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Prompts that repeat themselves (so drafts are proposed and many accepted) give, token for token, what
    plain greedy decoding gives: alone, and batched with sampled requests and a request that turns it off."""
    model = _model(mode, tmp_path)
    loop = [3, 14, 15, 9, 26, 5, 35] * 4
    prompts = {"loop": loop, "copy": [1, 2, 3, 4, 5, 6, 7, 8] * 3 + [1, 2], "short": [9, 9]}
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    def engine(k: int) -> Engine:
        e = Engine(model, eos_ids=[], max_seq_len=256, vocab_size=64, args=EngineArgs(speculative_tokens=k))
        assert e.runner.native is not None and e.runner.speculates
        return e

    plain = _run(engine(0), prompts, dict.fromkeys(prompts, greedy))
    fast = engine(3)
    alone = {rid: _run(fast, {rid: ids}, {rid: greedy})[rid] for rid, ids in prompts.items()}
    assert alone == plain
    assert fast.drafted > 0 and fast.accepted > 0, (fast.drafted, fast.accepted)
    mixed = dict(prompts) | {"sampled": loop, "off": loop}
    params = dict.fromkeys(prompts, greedy) | {
        "sampled": SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True),
        "off": SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, speculative_tokens=0),
    }
    batched = _run(engine(4), mixed, params)
    assert {rid: batched[rid] for rid in prompts} == plain and batched["off"] == plain["loop"]
    assert len(batched["sampled"]) == 30
    per_request = engine(0)  # the engine's default off, the request asks for drafts
    asked = _run(per_request, {"loop": loop}, {"loop": SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, speculative_tokens=5)})
    assert asked["loop"] == plain["loop"] and per_request.accepted > 0


@pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"native kernels: {native.unavailable_reason()}")
def test_drafts_stop_at_max_tokens_and_end_tokens(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model("int4", tmp_path)
    loop = [3, 14, 15, 9, 26, 5, 35] * 4
    e = Engine(model, eos_ids=[], max_seq_len=256, vocab_size=64, args=EngineArgs(speculative_tokens=8))
    for n in (1, 2, 5, 11):
        out = _run(e, {"r": loop}, {"r": SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)})
        assert len(out["r"]) == n
    plain = _run(Engine(model, eos_ids=[], max_seq_len=256, vocab_size=64), {"r": loop},
                 {"r": SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)})["r"]
    stop = plain[6]  # a token plain decoding produces: generation ends at its first occurrence, drafts or not
    want = plain[: plain.index(stop) + 1]
    got = _run(e, {"r": loop}, {"r": SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop,))})["r"]
    assert got == want
    assert e.runner.slots.lengths == [] or all(n == 0 for n in e.runner.slots.lengths)  # every row released


def test_a_request_past_the_time_limit_ends_with_its_next_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--max-request-seconds: a request that would generate for ever (no end token, a huge max_tokens) ends."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=4096)).eval()
    e = Engine(model, eos_ids=[], max_seq_len=4096, vocab_size=64, args=EngineArgs(max_request_seconds=0.3))
    e.add_request("forgotten", [1, 2, 3], SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True))
    events = []
    while e.has_unfinished():
        events += e.step()
    assert events[-1].finish_reason == "length" and len(events) < 4000
    assert e.num_running == 0 and e.runner.rows == []  # its slot is free
