"""The training-data pipeline: sources, each cleaning step (what it removes and what it keeps), PII
scrubbing, the pydoc corpus under the defaults, empty-dataset errors and determinism."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lamina.errors import InvalidRequestError
from lamina.foundation.corpora import pydoc_topics
from lamina.foundation.data import (
    CleaningOptions,
    CleaningReport,
    EmptyDatasetError,
    TextDocument,
    build_dataset,
    clean_documents,
    iter_texts,
    load_sources,
    repeated_line_ratio,
    scrub_pii,
    shingles,
    symbol_ratio,
)
from lamina.foundation.documents import DocumentError
from lamina.infra.datalake import DataLake

VOCABULARY = (
    "river", "mountain", "forest", "cloud", "stone", "bridge", "harbor", "lantern", "meadow", "valley",
    "winter", "summer", "garden", "window", "letter", "market", "engine", "silver", "copper", "signal",
    "orchard", "canyon", "island", "desert", "thunder", "pepper", "marble", "castle", "tunnel", "meadowlark",
    "violin", "compass", "anchor", "beacon", "glacier", "prairie", "candle", "ribbon", "saddle", "timber",
    "quarry",
)


def prose(seed: int, words: int = 80) -> str:
    """Sentences of random words: text that passes every filter and shares few 5-shingles with another seed."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        n = rng.randint(6, 12)
        sentences.append(" ".join(rng.choice(VOCABULARY) for _ in range(n)).capitalize() + ".")
        count += n
    return " ".join(sentences)


def doc(doc_id: str, text: str) -> TextDocument:
    return TextDocument(doc_id, text, "test")


CODE = '''def parse(value: str) -> dict[str, int]:
    """Parse "a=1,b=2" into {"a": 1, "b": 2}."""
    out: dict[str, int] = {}
    for item in value.split(","):
        key, _, number = item.partition("=")
        if not key:
            continue
        out[key.strip()] = int(number or 0)
    return out


class Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        return None

    def reset(self) -> None:
        self.counts.clear()
        return None
'''


@pytest.fixture
def lake(tmp_path: Path) -> DataLake:
    return DataLake(tmp_path / "datalake")


def _kept_ids(docs: list[TextDocument], options: CleaningOptions | None = None) -> tuple[list[str], CleaningReport]:
    kept, report = clean_documents(docs, options or CleaningOptions())
    return [d.doc_id for d in kept], report


# --- sources ----------------------------------------------------------------------------------------------


def test_text_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "docs" / "nested").mkdir(parents=True)
    (tmp_path / "docs" / "b.md").write_text("# B\n\nmarkdown")
    (tmp_path / "docs" / "a.txt").write_text("plain a")
    (tmp_path / "docs" / "nested" / "c.markdown").write_text("nested c")
    (tmp_path / "docs" / "skip.pdf").write_bytes(b"%PDF-1.4 not a supported type here")
    (tmp_path / "docs" / ".hidden.txt").write_text("hidden")
    (tmp_path / "docs" / ".git").mkdir()
    (tmp_path / "docs" / ".git" / "HEAD.txt").write_text("inside a hidden folder")
    single = tmp_path / "one.txt"
    single.write_bytes(b"\xef\xbb\xbfwith a BOM")

    docs = load_sources([str(tmp_path / "docs"), str(single), str(tmp_path / "docs" / "a.txt")])
    folder = (tmp_path / "docs").as_posix()
    assert [(d.doc_id, d.text) for d in docs] == [
        (f"{folder}/a.txt", "plain a"),
        (f"{folder}/b.md", "# B\n\nmarkdown"),
        (f"{folder}/nested/c.markdown", "nested c"),
        (single.as_posix(), "with a BOM"),
    ]  # a.txt named twice is read once
    assert all(d.source == d.doc_id for d in docs)


def test_jsonl_records(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [{"id": 1, "text": "first"}, {"content": "second", "title": "t"}, "third as a bare string", {"body": "fourth"}]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    docs = load_sources([str(path)])
    shown = path.as_posix()
    assert [(d.doc_id, d.text, d.source) for d in docs] == [
        (f"{shown}:1", "first", shown), (f"{shown}:2", "second", shown), (f"{shown}:4", "third as a bare string", shown),
        (f"{shown}:5", "fourth", shown),
    ]

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"text": "not this", "article": "this one"}) + "\n")
    assert [d.text for d in load_sources([str(custom)], text_field="article")] == ["this one"]
    with pytest.raises(DocumentError, match=r"line 1 has no text: expected a string under 'summary', found \['article', 'text'\]; pass --text-field"):
        load_sources([str(custom)], text_field="summary")
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DocumentError, match="line 2 is not valid JSON"):
        load_sources([str(path)])


def test_csv_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('id,Text,lang\n1,"first, with a comma",en\n2,"second\nover two lines",fr\n3,,de\n')
    docs = load_sources([str(path)])
    shown = path.as_posix()
    assert [(d.doc_id, d.text) for d in docs] == [
        (f"{shown}:1", "first, with a comma"), (f"{shown}:2", "second\nover two lines"), (f"{shown}:3", ""),
    ]
    assert [d.text for d in load_sources([str(path)], text_field="lang")] == ["en", "fr", "de"]
    other = tmp_path / "other.csv"
    other.write_text("id,message\n1,hello\n")
    with pytest.raises(DocumentError, match=r"has no text column text/content/body; its columns: \['id', 'message'\]; pass --text-field"):
        load_sources([str(other)])
    assert [d.text for d in load_sources([str(other)], text_field="message")] == ["hello"]


def test_csv_fields_beyond_the_csv_modules_cap_load_and_the_cap_is_put_back(tmp_path: Path) -> None:
    import csv

    before = csv.field_size_limit()
    long_text = "word " * (before // 5 + 1000)  # longer than the csv module's cap on one field
    path = tmp_path / "long.csv"
    path.write_text(f'id,text\n1,"{long_text}"\n')
    assert [d.text for d in load_sources([str(path)])] == [long_text]
    assert csv.field_size_limit() == before  # the cap is process-wide: lifted for the read only


def test_pydoc_corpus() -> None:
    docs = load_sources(["pydoc"])
    topics = pydoc_topics()
    assert len(docs) == len(topics) == 79
    assert docs[0].doc_id == f"pydoc:{next(iter(topics))}" and {d.source for d in docs} == {"pydoc"}
    assert len(load_sources(["pydoc", "pydoc"])) == 79


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"no such file or folder: 'missing\.txt'"):
        load_sources(["missing.txt"])
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(InvalidRequestError, match=r"unsupported file type '.docx'; supported: .txt, .md"):
        load_sources([str(tmp_path / "x.docx")])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DocumentError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\); re-save it as UTF-8"):
        load_sources([str(tmp_path / "latin1.txt")])
    with pytest.raises(InvalidRequestError, match="no sources given"):
        load_sources([])


# --- cleaning steps -------------------------------------------------------------------------------------


def test_normalize_cleans_text_and_drops_documents_left_empty() -> None:
    messy = "Caf\u0065\u0301 \u00a0menu\u200b\r\nline\x07 two   spaced\n\n\n\nend  " + " " + prose(1)
    kept, report = clean_documents([doc("messy", messy), doc("blank", " \u200b\n\t\u00a0\x00 ")])
    assert [d.doc_id for d in kept] == ["messy"]
    assert kept[0].text.startswith("Café menu\nline two spaced\n\nend ")  # NFC, NBSP, ZWSP, CRLF, BEL, runs
    step = report.step("normalize")
    assert (step.removed, step.kept, step.examples) == (1, 1, ("blank",))
    assert step.chars_after < step.chars_before


@pytest.mark.parametrize(
    ("step", "removed_text", "options"),
    [
        ("min_chars", "Too short to learn from.", CleaningOptions()),
        ("max_chars", prose(7, words=1200), CleaningOptions(max_chars=5000)),
        ("min_words", "Pneumonoultramicroscopicsilicovolcanoconiosis " * 4, CleaningOptions()),
        ("max_words", prose(8, words=1200), CleaningOptions(max_words=1000)),
        ("symbol_ratio", " ".join(["<<>>", "{{}}", "##", "ok", "$$%%"] * 10), CleaningOptions()),
        ("repeated_lines", "Buy now at our store today!\n" * 10 + prose(9, words=30), CleaningOptions()),
    ],
)
def test_each_filter_removes_its_documents_and_keeps_prose_and_code(step: str, removed_text: str, options: CleaningOptions) -> None:
    survivors = [doc("prose", prose(1)), doc("code", CODE), doc("table", pydoc_topics()["typesseq-mutable"])]
    kept, report = _kept_ids([*survivors, doc("bad", removed_text)], options)
    assert kept == ["prose", "code", "table"]
    assert report.step(step).removed == 1 and report.step(step).examples == ("bad",)
    assert sum(s.removed for s in report.steps) == 1  # no other step touched anything


def test_filter_signals_on_code_stay_under_the_defaults() -> None:
    defaults = CleaningOptions()
    assert 0.15 < symbol_ratio(CODE) < defaults.max_symbol_ratio
    assert 0 < repeated_line_ratio(CODE) < defaults.max_repeated_line_ratio
    assert symbol_ratio("a!") == 0.5 and symbol_ratio("snake_case") == 0.1 and symbol_ratio("") == 0.0
    assert repeated_line_ratio("a\n b \n\nb\na") == 0.5


def test_thresholds_of_one_turn_the_ratio_filters_off() -> None:
    junk = " ".join(["<<>>", "{{}}", "##", "$$%%"] * 10)
    kept, _ = _kept_ids([doc("junk", junk)], CleaningOptions(max_symbol_ratio=1, min_chars=0, min_words=0))
    assert kept == ["junk"]


def test_exact_duplicates_after_normalisation_keep_the_first() -> None:
    text = prose(3)
    copy = text.replace(" ", "\u00a0", 5) + "  \n"
    kept, report = _kept_ids([doc("original", text), doc("other", prose(4)), doc("copy", copy)])
    assert kept == ["original", "other"]
    assert report.step("exact_dedup").examples == ("copy = original",)
    kept, report = _kept_ids([doc("original", text), doc("copy", copy)], CleaningOptions(dedup=False, near_dedup=False))
    assert kept == ["original", "copy"]


def _jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_near_duplicates_go_and_different_documents_on_the_same_topic_stay() -> None:
    original = prose(11, words=400)
    words = original.split()
    for i in (40, 160, 300):  # a light edit: three words changed
        words[i] = "changed"
    edited = " ".join(words)
    different = prose(12, words=400)  # the same vocabulary, different text
    assert 0.8 < _jaccard(original, edited) < 1 and _jaccard(original, different) < 0.2

    calls: list[tuple[str, int, int]] = []
    kept, report = clean_documents([doc("original", original), doc("different", different), doc("edited", edited)],
                                   progress=lambda *args: calls.append(args))
    assert [d.doc_id for d in kept] == ["original", "different"]
    assert report.step("near_dedup").examples == ("edited ~ original",)
    assert report.step("exact_dedup").removed == 0
    assert calls[-1] == ("near_dedup", 3, 3)

    kept, report = clean_documents([doc("original", original), doc("edited", edited)], CleaningOptions(near_dedup=False))
    assert [d.doc_id for d in kept] == ["original", "edited"]
    assert "near_dedup" not in [s.step for s in report.steps]


# --- PII ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail jane.doe+news@example.co.uk today", "mail <EMAIL> today", "email"),
        ("call +44 20 7946 0958 or", "call <PHONE> or", "phone"),
        ("call +1 (415) 555-2671.", "call <PHONE>.", "phone"),
        ("call +4930123456", "call <PHONE>", "phone"),
        ("US (415) 555-2671 and", "US <PHONE> and", "phone"),
        ("US 415-555-2671", "US <PHONE>", "phone"),
        ("toll free 1-800-555-0199", "toll free <PHONE>", "phone"),
        ("aws AKIAIOSFODNN7EXAMPLE key", "aws <SECRET> key", "secret"),
        ("gh ghp_" + "a1B2" * 9 + " end", "gh <SECRET> end", "secret"),
        ("openai sk-proj-" + "Ab3dEf6hIj9kLm2nOp5q" + " end", "openai <SECRET> end", "secret"),
        ('api_key = "0123456789abcdef0123456789abcdef"', 'api_key = "<SECRET>"', "secret"),
        ("DB_PASSWORD: c2VjcmV0LXBhc3N3b3JkLTEyMzQ1Ng==", "DB_PASSWORD: <SECRET>", "secret"),
        ('{"auth_token": "Zm9vYmFyMTIzNDU2Nzg5MGFiY2RlZg"}', '{"auth_token": "<SECRET>"}', "secret"),
    ],
)
def test_pii_is_replaced_by_placeholders(text: str, expected: str, kind: str) -> None:
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == expected and counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "version 3.12.1 released 2024-01-15 at 10:30",
        "format(3.14, '+3.140000') and '+000000120'",
        "token = get_token(user)  # not a secret",
        "password = 'short'",
        "ip 192.168.100.200 port 8080",
        "use sk-learn-style names",
        "a@b is not an address, nor is user@localhost",
    ],
)
def test_pii_scrubbing_leaves_lookalikes(text: str) -> None:
    assert scrub_pii(text) == (text, {})


def test_pii_scrubbing_is_off_by_default_and_counted_when_on() -> None:
    text = prose(5) + " Write to ada@example.org or call 415-555-2671, key AKIAIOSFODNN7EXAMPLE."
    kept, report = clean_documents([doc("a", text), doc("b", prose(6))])
    assert kept[0].text == text and "scrub_pii" not in [s.step for s in report.steps]
    kept, report = clean_documents([doc("a", text), doc("b", prose(6))], CleaningOptions(scrub_pii=True))
    assert kept[0].text.endswith("Write to <EMAIL> or call <PHONE>, key <SECRET>.")
    assert report.step("scrub_pii").details == {"email": 1, "phone": 1, "secret": 1, "documents_changed": 1}


# --- datasets -------------------------------------------------------------------------------------------


def test_pydoc_builds_with_the_defaults(lake: DataLake) -> None:
    version, report = build_dataset(lake, "pydoc", ["pydoc"])
    assert version.documents >= 75 and report.input_documents == 79
    filters = ("min_chars", "max_chars", "min_words", "max_words", "symbol_ratio", "repeated_lines")
    assert sum(report.step(f).removed for f in filters) <= 2
    assert report.step("exact_dedup").examples == ("pydoc:if = pydoc:else",)  # the same text in pydoc_data
    assert version.manifest["sources"] == ["pydoc"]
    assert [s["step"] for s in version.manifest["steps"]] == [s.step for s in report.steps]
    assert version.manifest["options"]["min_chars"] == CleaningOptions().min_chars
    first = next(iter_texts(lake, "pydoc"))
    assert first[0] == "pydoc:assert" and first[1].startswith('The "assert" statement')


def test_empty_datasets_name_the_step_that_emptied_them(lake: DataLake, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    with pytest.raises(EmptyDatasetError, match=r"dataset 'x' is empty: the sources hold no documents") as err:
        build_dataset(lake, "x", [str(docs)])
    assert err.value.step == "load"

    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(prose(i, words=30))
    with pytest.raises(EmptyDatasetError) as err:
        build_dataset(lake, "x", [str(docs)], CleaningOptions(min_chars=10_000, max_chars=20_000))
    assert err.value.message == (
        "dataset 'x' is empty: all 12 documents were removed by the min_chars filter (min_chars=10000); lower --min-chars"
    )
    assert err.value.step == "min_chars" and err.value.status_code == 400

    (docs / "junk.txt").write_text(" ".join(["<<>>", "{{}}", "##", "$$%%"] * 11))  # 44 "words"
    with pytest.raises(EmptyDatasetError, match=r"the symbol_ratio filter removed the last 1 of 13 documents "
                                                r"\(max_symbol_ratio=0.5\); raise --max-symbol-ratio") as err:
        build_dataset(lake, "x", [str(docs)], CleaningOptions(min_words=42))  # the prose has 30 to 41
    assert err.value.step == "symbol_ratio"

    with pytest.raises(EmptyDatasetError, match="removed by normalisation"):
        build_dataset(lake, "blank", [str(_write(tmp_path / "blank.txt", " \n\t "))])
    assert lake.list() == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_same_input_same_order_and_hashes(lake: DataLake, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in (3, 1, 2):
        (folder / f"d{i}.txt").write_text(prose(i))
    (folder / "records.jsonl").write_text("\n".join(json.dumps({"text": prose(10 + i)}) for i in range(3)))
    first, _ = build_dataset(lake, "a", [str(folder), "pydoc"])
    again, _ = build_dataset(lake, "a", [str(folder), "pydoc"])
    assert (first.version, again.version) == (1, 2)
    assert first.manifest["hashes"] == again.manifest["hashes"]
    ids = [doc_id for doc_id, _ in iter_texts(lake, "a")]
    assert ids[:6] == [f"{folder.as_posix()}/{n}" for n in ("d1.txt", "d2.txt", "d3.txt", "records.jsonl:1",
                                                           "records.jsonl:2", "records.jsonl:3")]
    assert ids[6] == "pydoc:assert" and ids == [doc_id for doc_id, _ in iter_texts(lake, "a", 1)]


def test_iter_texts_streams_every_part_in_order(tmp_path: Path) -> None:
    lake = DataLake(tmp_path / "lake", part_bytes=2000)
    version, _ = build_dataset(lake, "small-parts", ["pydoc"])
    assert len(version.files) > 10
    streamed = list(iter_texts(lake, "small-parts", batch_size=7))
    table = lake.read("small-parts")
    assert streamed == list(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"min_chars": -1}, r"min_chars \(--min-chars\) must be 0 or more \(got -1\)"),
        ({"min_words": 50, "max_words": 10}, r"max_words \(--max-words\) \(10\) is below min_words"),
        ({"max_symbol_ratio": 1.5}, r"max_symbol_ratio \(--max-symbol-ratio\) must be between 0 and 1 \(got 1.5\)"),
        ({"max_repeated_line_ratio": -0.1}, r"--max-repeated-lines\) must be between 0 and 1"),
        ({"near_dup_threshold": 0}, "near_dup_threshold must be in"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, float], expected: str) -> None:
    with pytest.raises(InvalidRequestError, match=expected):
        CleaningOptions(**kwargs)  # type: ignore[arg-type]


def test_invalid_dataset_name_is_refused_before_the_work(lake: DataLake) -> None:
    with pytest.raises(InvalidRequestError, match="invalid dataset name 'no spaces'"):
        build_dataset(lake, "no spaces", ["does-not-exist"])
