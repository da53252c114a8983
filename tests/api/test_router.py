"""The replica router: prefix-cache affinity with a load guard, and round robin."""

from __future__ import annotations

import pytest

from lamina.api.router import BLOCK, PrefixRouter, block_hashes, routing_text

SYSTEM_A = "You are a support agent for a bicycle shop. " * 20
SYSTEM_B = "You translate English into French, carefully. " * 20


def _chat(system: str, question: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


def test_requests_sharing_a_long_prefix_go_to_the_same_replica_and_new_prefixes_to_the_idlest() -> None:
    router = PrefixRouter(3)
    loads = [0, 0, 0]
    first = router.choose(routing_text(_chat(SYSTEM_A, "q0")), loads)
    loads[first] += 1
    for i in range(1, 10):
        assert router.choose(routing_text(_chat(SYSTEM_A, f"question {i}")), loads) == first
    other = router.choose(routing_text(_chat(SYSTEM_B, "q")), [0, 0, 0])
    assert other != first  # cached nowhere: the least loaded, and of those the one that remembers least
    assert router.choose(routing_text(_chat(SYSTEM_B, "another")), [5, 5, 5]) == other


def test_a_short_or_barely_shared_prompt_goes_to_the_least_loaded() -> None:
    router = PrefixRouter(2)
    router.choose("x" * (BLOCK * 2) + "tail", [0, 0])  # replica 0 holds two blocks of x
    assert router.choose("hi", [3, 1]) == 1  # under one block: no affinity
    long_tail = "x" * (BLOCK * 2) + "y" * (BLOCK * 10)  # shares 2 of 12 blocks: under the 0.3 bar
    assert router.choose(long_tail, [3, 1]) == 1


def test_the_load_guard_beats_affinity() -> None:
    router = PrefixRouter(2, balance_abs=4)
    text = routing_text(_chat(SYSTEM_A, "q"))
    assert router.choose(text, [0, 0]) == 0
    assert router.choose(text, [4, 0]) == 0  # 4 above the idlest: not more than balance_abs yet
    assert router.choose(text, [10, 2]) == 1  # 8 above and 5x: balance wins


def test_round_robin_cycles() -> None:
    router = PrefixRouter(3, "round_robin")
    assert [router.choose(SYSTEM_A, [0, 0, 0]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_what_is_routed_on() -> None:
    assert routing_text({"prompt": "Once upon"}) == "Once upon"
    assert routing_text({"prompt": ["first", "second"]}) == "first"
    assert routing_text({"instructions": "Be brief.", "input": "hello"}) == "Be brief.\nhello"
    assert routing_text(_chat("S", "Q")) == "<system>S\n<user>Q"
    assert routing_text([1, 2]) == "" and routing_text({"input": [{"type": "function_call_output", "output": "1"}]}) == "<function_call_output>"
    hashes = block_hashes("a" * BLOCK * 3 + "b")
    assert len(hashes) == 3 and block_hashes("a" * BLOCK * 2 + "c" * BLOCK)[:2] == hashes[:2]
    with pytest.raises(ValueError):
        PrefixRouter(0)
