"""The Python API on the real SmolLM2: generate, stream, chat, stop, limits, cache reuse, bad input."""

from __future__ import annotations

import pytest

from lamina.errors import ContextLengthError, InvalidRequestError
from lamina.llm import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_stream_chat_pieces_add_up_to_chat(smollm) -> None:
    params = SamplingParams(temperature=0, max_tokens=40)
    pieces = list(smollm.stream_chat(QUESTION, params))
    assert len(pieces) > 3
    assert "".join(pieces) == smollm.chat(QUESTION, params).text


def test_generate_continues_plain_text(smollm) -> None:
    completion = smollm.generate("The capital of France is", temperature=0, max_tokens=8)
    assert completion.completion_tokens == 8 and completion.finish_reason == "length"
    assert completion.prompt_tokens == len(smollm.tokenizer.encode("The capital of France is"))
    assert "".join(smollm.stream("The capital of France is", temperature=0, max_tokens=8)) == completion.text


def test_stop_string_ends_and_is_not_returned(smollm) -> None:
    completion = smollm.chat(QUESTION, temperature=0, max_tokens=30, stop=["Paris"])
    assert completion.finish_reason == "stop"
    assert "Paris" not in completion.text and completion.text.startswith("The capital of France is")


def test_seed_reproduces_a_sampled_answer(smollm) -> None:
    story = [{"role": "user", "content": "Tell me a story."}]
    a = smollm.chat(story, temperature=1.0, max_tokens=24, seed=123)
    b = smollm.chat(story, temperature=1.0, max_tokens=24, seed=123)
    c = smollm.chat(story, temperature=1.0, max_tokens=24, seed=124)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_multi_turn_reuses_the_cached_prefix_without_changing_the_answer(smollm) -> None:
    first = smollm.chat(QUESTION, temperature=0, max_tokens=20)
    follow_up = [*QUESTION, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    reused = smollm.chat(follow_up, temperature=0, max_tokens=20)
    assert reused.cached_tokens > len(smollm.encode_chat(QUESTION)) - 2
    smollm.engine.reset()
    fresh = smollm.chat(follow_up, temperature=0, max_tokens=20)
    assert fresh.cached_tokens == 0 and fresh.token_ids == reused.token_ids


def test_logprobs_are_returned_when_asked(smollm) -> None:
    completion = smollm.chat(QUESTION, temperature=0, max_tokens=5, logprobs=2)
    assert completion.logprobs is not None and len(completion.logprobs) == 5
    first = completion.logprobs[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 2 and first.top_logprobs[0].token == first.token
    assert first.bytes == first.token.encode()


def test_empty_prompt_is_refused(smollm) -> None:
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        smollm.generate("   ")


def test_prompt_beyond_the_context_is_refused_with_the_numbers(smollm) -> None:
    with pytest.raises(ContextLengthError, match=r"maximum context length is 8192 tokens.*8200"):
        smollm.generate("hello", max_tokens=8200 - len(smollm.tokenizer.encode("hello")))


def test_embedding_model_is_not_a_generator(tmp_path) -> None:
    from lamina import LLM

    with pytest.raises(InvalidRequestError, match="embedding model"):
        LLM.load("all-minilm-l6-v2", device="cpu", dtype="float32", home=tmp_path)


def test_leaving_a_sync_stream_early_frees_its_place(smollm) -> None:
    """The synchronous path hands events over a queue, not an event loop: closing it aborts the request."""
    import time

    stream = smollm.stream("Once upon a time", temperature=0, max_tokens=500, ignore_eos=True)
    assert next(stream)
    assert smollm.engine.num_running == 1
    stream.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while smollm.engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert smollm.engine.num_running == 0


def test_the_sync_api_works_inside_a_running_event_loop(smollm) -> None:
    """As in a notebook: plain calls from a thread whose event loop is running."""
    import asyncio

    async def inside() -> str:
        return smollm.generate("The capital of France is", temperature=0, max_tokens=4).text

    assert asyncio.run(inside()) == smollm.generate("The capital of France is", temperature=0, max_tokens=4).text
