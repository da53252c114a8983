"""Streaming text: never half a character, never any part of a stop string."""

from __future__ import annotations

import pytest

from lamina.llm.text.detokenize import IncrementalDetokenizer, StopStrings

TEXTS = ["Emoji 🙂🚀👩‍👩‍👧 and 東京タワー, naïve café", "plain ascii text", "🏳️‍🌈" * 5, "Ελληνικά и русский"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_are_whole_characters(smollm, text: str) -> None:
    tok = smollm.tokenizer
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    if text.startswith("🏳"):
        assert len([p for p in pieces if p]) < len(ids)  # some tokens were held back mid-character


@pytest.mark.parametrize(
    ("pieces", "stops", "released", "stopped"),
    [
        (["Hello wor", "ld END tail"], ["END"], "Hello world ", True),
        (["Hello E", "N", "D"], ["END"], "Hello ", True),
        (["Hello E", "N", "x"], ["END"], "Hello ENx", False),
        (["abc"], ["c", "bc"], "a", True),
        (["no stop here"], [], "no stop here", False),
        (["ab", "c###", "d"], ["###"], "abc", True),
    ],
)
def test_stop_strings_are_cut_and_withheld(pieces, stops, released, stopped) -> None:
    s = StopStrings(stops)
    out = []
    for p in pieces:
        out.append(s.push(p))
        if s.stopped:
            break
        assert not any(stop in "".join(out) for stop in stops)
    if not s.stopped:
        out.append(s.flush())
    assert "".join(out) == released
    assert s.stopped == stopped
