"""Continuous batching: batched greedy output equals batch-1 output; KV memory, cancellation, prefix reuse."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidRequestError
from lamina.llm import SamplingParams
from lamina.llm.engine.core import Engine, EngineArgs

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "import numpy as np\nx =",
    "Water boils at",
]


def _engine(llm, **args) -> Engine:  # type: ignore[no-untyped-def]
    c = llm.config
    return Engine(llm.model, eos_ids=[], max_seq_len=c.max_seq_len, vocab_size=c.vocab_size, args=EngineArgs(**args))


def _run(engine: Engine, requests: dict[str, list[int]], params: SamplingParams, salt: dict[str, str] | None = None) -> dict:
    for rid, ids in requests.items():
        engine.add_request(rid, ids, params, cache_salt=(salt or {}).get(rid, ""))
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append(event.token_id)
            cached[event.request_id] = event.cached_prompt_tokens
    return {"tokens": out, "cached": cached}


def test_batched_greedy_equals_batch_one(smollm) -> None:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    requests = {f"r{i}": smollm.tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    together = _run(_engine(smollm, retained_caches=0), requests, params)["tokens"]
    for rid, ids in requests.items():
        alone = _run(_engine(smollm, retained_caches=0), {rid: ids}, params)["tokens"][rid]
        assert together[rid] == alone, rid


def test_requests_join_and_leave_between_steps(smollm) -> None:
    engine = _engine(smollm, retained_caches=0)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ids = {f"r{i}": smollm.tokenizer.encode(p) for i, p in enumerate(PROMPTS[:3])}
    expected = {rid: _run(_engine(smollm, retained_caches=0), {rid: v}, params)["tokens"][rid] for rid, v in ids.items()}
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    engine.add_request("r0", ids["r0"], params)
    steps = 0
    while engine.has_unfinished():
        if steps == 3:
            engine.add_request("r1", ids["r1"], params)  # arrives while r0 decodes
        if steps == 7:
            engine.add_request("r2", ids["r2"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        for event in engine.step():
            out[event.request_id].append(event.token_id)
        steps += 1
    assert out == expected
    assert engine.runner.rows == [] and engine.runner.slots.slots == 0  # everything freed


def test_cancelled_requests_free_their_kv(smollm) -> None:
    engine = _engine(smollm, retained_caches=0)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"r{i}", smollm.tokenizer.encode(p), params)
    for _ in range(3):
        engine.step()
    assert len(engine.runner.rows) == 4 and engine.runner.decoding == 4
    engine.abort("r1")
    engine.abort("r3")
    assert [s.request_id for s in engine.runner.rows] == ["r0", "r2"] and engine.runner.decoding == 2
    assert all(s.row == b for b, s in enumerate(engine.runner.rows))
    remaining = {"r0": [], "r2": []}
    while engine.has_unfinished():
        for event in engine.step():
            remaining[event.request_id].append(event.token_id)
    assert all(len(v) == 47 for v in remaining.values())
    assert engine.runner.rows == [] and engine.runner.slots.nbytes == 0


def test_kv_budget_queues_then_refuses(smollm) -> None:
    per_position = _engine(smollm).runner.slots.bytes_per_position
    engine = _engine(smollm, retained_caches=0, kv_cache_gb=600 * per_position / 1024**3)  # room for 2 rows of 256
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", smollm.tokenizer.encode(PROMPTS[i]), params)
    engine.step()
    assert len(engine.runner.rows) == 2 and engine.num_waiting == 1  # the third waits for memory
    done = set()
    while engine.has_unfinished():
        assert engine.runner.slots.nbytes <= engine.runner.kv_budget_bytes  # rows grow by doubling, never past it
        for event in engine.step():
            if event.finish_reason:
                done.add(event.request_id)
    assert done == {"r0", "r1", "r2"}
    with pytest.raises(InvalidRequestError, match="more than the whole budget"):
        engine.add_request("big", smollm.tokenizer.encode("hi"), SamplingParams(max_tokens=2000))


def test_slot_rows_grow_by_doubling_within_the_budget(smollm) -> None:
    engine = _engine(smollm, retained_caches=0, max_running=64)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)  # (all 20 still running at the end)
    sizes = []
    for i in range(20):  # arrivals one by one: the cache is reallocated log2(20) times, not 20
        engine.add_request(f"r{i}", smollm.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), params)
        engine.step()
        sizes.append(engine.runner.slots.slots)
    assert sorted(set(sizes)) == [1, 2, 4, 8, 16, 32] and len(engine.runner.rows) == 20
    tight = _engine(smollm, retained_caches=0, max_running=64, kv_cache_gb=5 * 256 * engine.runner.slots.bytes_per_position / 1024**3)
    for i in range(5):
        tight.add_request(f"t{i}", smollm.tokenizer.encode(PROMPTS[i]), params)
        tight.step()
        assert tight.runner.slots.nbytes <= tight.runner.kv_budget_bytes  # doubling stops at what the budget holds


def test_shared_prefix_is_copied_not_recomputed(smollm) -> None:
    system = "You are a careful assistant. " * 40
    a = smollm.tokenizer.encode(system + "Question one?")
    b = smollm.tokenizer.encode(system + "Question two, different?")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine = _engine(smollm)
    first = _run(engine, {"a": a}, params)
    second = _run(engine, {"b": b}, params)
    shared = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    assert first["cached"]["a"] == 0 and second["cached"]["b"] >= shared - 2
    assert second["tokens"]["b"] == _run(_engine(smollm, retained_caches=0), {"b": b}, params)["tokens"]["b"]
    # running requests share too, and tenants (salts) never do
    engine = _engine(smollm, retained_caches=0)
    both = _run(engine, {"a": a, "b": b}, params, salt={"a": "tenant-1", "b": "tenant-1"})
    assert both["cached"]["b"] >= shared - 2
    apart = _run(_engine(smollm, retained_caches=0), {"a": a, "b": b}, params, salt={"a": "tenant-1", "b": "tenant-2"})
    assert apart["cached"]["b"] == 0


def test_the_last_row_hands_its_tensors_to_the_retained_cache(smollm) -> None:
    """A request alone: as it finishes, its keys and values are kept for prefix reuse without a copy (the slot
    cache's own tensors change hands, the slot cache starts afresh), and the next turn reuses them, decoding what
    a fresh engine decodes."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine = _engine(smollm)
    ids = smollm.tokenizer.encode(PROMPTS[2])
    engine.add_request("a", ids, params)
    seen, out = set(), []
    while engine.has_unfinished():
        seen.add(engine.runner.slots.k.data_ptr())
        out += [e.token_id for e in engine.step()]
    (kept,) = engine.runner._retained.values()
    assert kept.cache.k.data_ptr() in seen and kept.cache.length == len(ids) + len(out) - 1
    assert engine.runner.slots.nbytes == 0 and engine.runner.slots.lengths == []
    follow = ids + out + smollm.tokenizer.encode(" And then?")
    again = _run(engine, {"b": follow}, params)
    assert again["cached"]["b"] == len(ids) + len(out) - 1
    assert again["tokens"]["b"] == _run(_engine(smollm, retained_caches=0), {"b": follow}, params)["tokens"]["b"]


def test_sequences_that_outgrow_the_cache_and_finish_out_of_order(smollm) -> None:
    """The KV rows grow (a new allocation, inside the forward's inference mode) when a sequence passes a
    CACHE_STEP boundary; a sequence finishing in the middle of the rows afterwards is compacted away outside the
    forward. That once raised "Inplace update to inference tensor outside InferenceMode" and took the engine down."""
    from lamina.llm.engine.runner import CACHE_STEP

    engine = _engine(smollm, retained_caches=1)
    ids = smollm.tokenizer.encode(PROMPTS[0])
    lengths = {"a": CACHE_STEP + 40, "b": CACHE_STEP + 8, "c": CACHE_STEP + 24}  # b, in the middle row, finishes first
    for rid, n in lengths.items():
        engine.add_request(rid, ids, SamplingParams(max_tokens=n - len(ids), temperature=0, ignore_eos=True))
    out = {rid: 0 for rid in lengths}
    while engine.has_unfinished():
        for e in engine.step():
            out[e.request_id] += 1
    assert out == {rid: n - len(ids) for rid, n in lengths.items()}
    assert engine.runner.rows == [] and engine.runner.usage == 0


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(smollm, monkeypatch) -> None:
    from lamina.llm.engine.async_engine import AsyncEngine

    engine = AsyncEngine(_engine(smollm, retained_caches=0))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    calls = {"n": 0}
    real = engine._engine.runner.execute

    def flaky(work):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(work)

    monkeypatch.setattr(engine._engine.runner, "execute", flaky)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            list(engine.generate_sync(smollm.tokenizer.encode(PROMPTS[1]), params))
        again = list(engine.generate_sync(smollm.tokenizer.encode(PROMPTS[1]), params))
        assert len(again) == 4 and again[-1].finish_reason == "length"
        assert engine._engine.runner.rows == []
    finally:
        engine.shutdown()
