"""Sampling parameters: validation with the fix in the message, and what each truncation keeps."""

from __future__ import annotations

import pytest
import torch

from lamina.errors import InvalidRequestError
from lamina.llm.engine.sampling import Sampler, SamplingParams, argmax, sample_batch


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("max_tokens", 0, "1 or more"),
        ("max_tokens", -5, "1 or more"),
        ("temperature", -0.1, "use 0 for greedy"),
        ("top_p", -0.1, "1 turns it off"),
        ("top_p", 1.5, "1 turns it off"),
        ("top_k", -2, "0 turns it off"),
        ("min_p", 1.5, "0 turns it off"),
        ("repetition_penalty", 0.0, "1 turns it off"),
        ("presence_penalty", 3.0, "[-2, 2]"),
        ("frequency_penalty", -3.0, "[-2, 2]"),
        ("logprobs", 21, "[0, 20]"),
        ("stop", ["ok", ""], "non-empty"),
    ],
)
def test_bad_values_are_refused_with_the_fix(field: str, value, fix: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert fix in info.value.message and info.value.param == field


def test_stop_accepts_a_string_or_a_list() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_k=-1).top_k == 0


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 400) -> set[int]:
    sampler = Sampler(params, [], logits.shape[0], torch.device("cpu"))
    return {sampler(logits).token_id for _ in range(n)}


LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))


def test_greedy_picks_the_argmax() -> None:
    assert _draws(SamplingParams(temperature=0), LOGITS, 5) == {0}


def test_argmax_is_torchs_on_ties_nans_and_views() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 49152, generator=g)
    rows[1, [7, 300, 40000]] = 50.0  # a tie: the first
    rows[2, [900, 1200]] = float("nan")  # NaN counts as the largest: the first NaN
    rows[3] = 0.0
    rows[4, -1] = float("inf")
    for row in (*rows, rows[:, 5], rows[5, ::3]):  # rows, a column (strided) and a strided slice
        assert argmax(row) == int(torch.argmax(row))
    assert argmax(rows[0].double()) == int(torch.argmax(rows[0]))


def test_top_k_keeps_k_tokens() -> None:
    assert _draws(SamplingParams(top_k=2, seed=0), LOGITS) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert _draws(SamplingParams(top_p=0.7, seed=0), LOGITS) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert _draws(SamplingParams(top_p=0.45, seed=0), LOGITS) == {0}
    assert _draws(SamplingParams(top_p=0.0, seed=0), LOGITS) == {0}  # 0 (OpenAI takes it): the top token alone
    assert _draws(SamplingParams(top_p=0.76, seed=0), LOGITS) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens() -> None:
    assert _draws(SamplingParams(min_p=0.25, seed=0), LOGITS) == {0, 1, 2}  # keeps p >= 0.125


def test_plain_sampling_reaches_every_token() -> None:
    assert _draws(SamplingParams(seed=0), LOGITS, 2000) == {0, 1, 2, 3, 4}


def test_seed_makes_sampling_reproducible() -> None:
    logits = torch.randn(1000)

    def run(seed: int) -> list[int]:
        s = Sampler(SamplingParams(seed=seed), [], 1000, torch.device("cpu"))
        return [s(logits).token_id for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_penalties_push_away_from_seen_tokens() -> None:
    logits = torch.tensor([2.0, 1.9, 0.0])
    assert Sampler(SamplingParams(temperature=0), [0], 3, torch.device("cpu"))(logits).token_id == 0
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.2), [0], 3, torch.device("cpu"))(logits).token_id == 1
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.5), [], 3, torch.device("cpu"))
    assert [s(logits).token_id for _ in range(2)] == [0, 1]  # the output's own token 0 is penalised next time
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.06), [], 3, torch.device("cpu"))
    assert [s(logits).token_id for _ in range(3)] == [0, 0, 1]  # 2.0 -> 1.94 -> 1.88 < 1.9


def test_logprobs_are_the_raw_distribution() -> None:
    s = Sampler(SamplingParams(temperature=0, logprobs=3), [], 5, torch.device("cpu"))
    sample = s(LOGITS)
    assert sample.token_id == 0
    assert sample.logprob == pytest.approx(float(torch.log(torch.tensor(0.5))), abs=1e-6)
    assert [t for t, _ in sample.top_logprobs] == [0, 1, 2]


def test_inverse_cdf_draws_follow_the_distribution_and_never_a_zero() -> None:
    from lamina.llm.engine.sampling import _draw

    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.7, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_draw(probs, g) for _ in range(20000)]), minlength=6).float() / 20000
    assert counts[[0, 2, 5]].sum() == 0  # zero-probability tokens, first and last included, are never drawn
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    unnormalised = probs * 7.0  # the same distribution without normalising
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([_draw(unnormalised, g) for _ in range(20000)]), minlength=6).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_a_batch_samples_each_row_as_its_own_sampler_would() -> None:
    """sample_batch: greedy rows are their argmax, seeded or penalised rows go one by one (the same tokens as
    alone), and plain temperature rows draw from their own softmax (frequencies within a loose band)."""


    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(5, vocab) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=5), SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0, logprobs=2)]
    batch = [Sampler(p, [1, 2, 3], vocab, torch.device("cpu")) for p in params]
    alone = [Sampler(p, [1, 2, 3], vocab, torch.device("cpu")) for p in params]
    got = sample_batch(batch, logits)
    assert got[0].token_id == int(logits[0].argmax())
    for i in (1, 2, 4):
        assert got[i] == alone[i](logits[i]), i
    assert [s.batchable for s in batch] == [True, False, False, True, False]
    hot = Sampler(SamplingParams(temperature=0.5), [], vocab, torch.device("cpu"))
    draws = torch.tensor([s.token_id for s in sample_batch([hot] * 4000, logits[3:4].expand(4000, vocab).contiguous())])
    expected = torch.softmax(logits[3] / 0.5, dim=-1)
    freq = torch.bincount(draws, minlength=vocab).float() / len(draws)
    top = expected.argsort(descending=True)[:3]
    assert torch.allclose(freq[top], expected[top], atol=0.05), (freq[top], expected[top])
