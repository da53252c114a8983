"""Files, vector stores, search, embeddings and grounded chat through the official `openai` SDK."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.foundation.test_documents import make_pdf
from tests.server import Server, start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
FACTS = {
    "mascot.txt": "The Lamina project's mascot is a basalt tortoise named Quill. Quill lives in the project's README.",
    "release.md": "# Releases\n\nLamina ships a new release every six weeks, always on a Thursday.",
    "office.html": "<html><head><title>Office</title><script>var x = 'tracking';</script></head><body><nav>menu</nav>"
                   "<p>The Lamina office is on the fourth floor of a lighthouse in Brittany.</p><footer>© 2026</footer></body></html>",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    s = start_server(tmp_path_factory.mktemp("rag"), "--max-upload-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def uploaded(client, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("docs")
    ids = {}
    for name, text in FACTS.items():
        (folder / name).write_text(text)
        ids[name] = client.files.create(file=(folder / name).open("rb"), purpose="assistants").id
    pdf = make_pdf(["Page one is about budgets.", "The Lamina budget for 2027 is forty-two thousand euros."])
    ids["budget.pdf"] = client.files.create(file=("budget.pdf", pdf), purpose="assistants").id
    return ids


@pytest.fixture(scope="module")
def store(client, uploaded):  # type: ignore[no-untyped-def]
    vs = client.vector_stores.create(name="lamina-facts", file_ids=[uploaded["mascot.txt"], uploaded["release.md"]])
    assert vs.file_counts.completed == 2 and vs.file_counts.total == 2
    for name in ("office.html", "budget.pdf"):
        f = client.vector_stores.files.create(vector_store_id=vs.id, file_id=uploaded[name], attributes={"source": name, "year": 2026})
        assert f.status == "completed" and f.last_error is None
    return vs


def test_files_api(client, uploaded) -> None:
    listed = {f.id for f in client.files.list()}
    assert set(uploaded.values()) <= listed
    f = client.files.retrieve(uploaded["mascot.txt"])
    assert f.filename == "mascot.txt" and f.bytes == len(FACTS["mascot.txt"]) and f.purpose == "assistants"
    assert client.files.content(uploaded["mascot.txt"]).read() == FACTS["mascot.txt"].encode()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")


def test_upload_over_the_limit_is_413(client) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.txt", b"x" * (2 * 1024 * 1024)), purpose="assistants")
    assert info.value.status_code == 413


def test_store_objects_and_file_listing(client, store, uploaded) -> None:
    got = client.vector_stores.retrieve(store.id)
    assert got.name == "lamina-facts" and got.object == "vector_store" and got.file_counts.completed == 4 and got.usage_bytes > 0
    assert store.id in {s.id for s in client.vector_stores.list()}
    files = client.vector_stores.files.list(vector_store_id=store.id)
    assert {f.id for f in files} == set(uploaded.values())
    assert client.vector_stores.files.retrieve(file_id=uploaded["budget.pdf"], vector_store_id=store.id).status == "completed"


def test_search_returns_openai_result_objects(client, store, uploaded) -> None:
    page = client.vector_stores.search(vector_store_id=store.id, query="What animal is the mascot?", max_num_results=3)
    top = page.data[0]
    assert top.file_id == uploaded["mascot.txt"] and top.filename == "mascot.txt" and 0 < top.score <= 1
    assert "basalt tortoise" in top.content[0].text and top.content[0].type == "text"
    pdf = client.vector_stores.search(vector_store_id=store.id, query="budget for 2027 in euros", max_num_results=1).data[0]
    assert pdf.filename == "budget.pdf" and pdf.attributes["page"] == 2 and pdf.attributes["source"] == "budget.pdf"
    html = client.vector_stores.search(vector_store_id=store.id, query="which floor is the office on").data[0]
    assert html.filename == "office.html" and "tracking" not in html.content[0].text and "menu" not in html.content[0].text


def test_search_filters_and_rankers(client, store, uploaded) -> None:
    only_pdf = client.vector_stores.search(vector_store_id=store.id, query="Lamina", max_num_results=10,
                                           filters={"type": "eq", "key": "source", "value": "budget.pdf"})
    assert {r.filename for r in only_pdf.data} == {"budget.pdf"}
    tagged = client.vector_stores.search(vector_store_id=store.id, query="Lamina", max_num_results=10,
                                         filters={"type": "and", "filters": [{"type": "gte", "key": "year", "value": 2026},
                                                                             {"type": "ne", "key": "source", "value": "budget.pdf"}]})
    assert {r.filename for r in tagged.data} == {"office.html"}
    for ranker in ("vector", "bm25", "hybrid", "auto"):
        r = client.vector_stores.search(vector_store_id=store.id, query="tortoise named Quill",
                                        ranking_options={"ranker": ranker}, max_num_results=2)
        assert r.data[0].filename == "mascot.txt", ranker


def test_embeddings_match_the_library(client) -> None:
    from lamina import Embedder

    texts = ["A basalt tortoise.", "Lighthouses in Brittany", "東京 🙂"]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the SDK asks for base64 and decodes it
    local = Embedder.load("all-minilm-l6-v2").embed(texts)
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), local, atol=1e-6)
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 6 and r.model == "all-minilm-l6-v2"
    plain = client.embeddings.create(model="all-minilm-l6-v2", input="A basalt tortoise.", encoding_format="float")
    np.testing.assert_allclose(plain.data[0].embedding, local[0], atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-minilm-l6-v2", input=[])


def test_grounded_chat_cites_its_sources(client, store, uploaded) -> None:
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=60,
                                       messages=[{"role": "user", "content": "What is the mascot of the Lamina project?"}],
                                       extra_body={"vector_store_ids": [store.id]})
    citations = r.model_extra["citations"]
    assert citations[0]["file_id"] == uploaded["mascot.txt"] and citations[0]["filename"] == "mascot.txt"
    assert citations[0]["index"] == 1 and "basalt tortoise" in citations[0]["snippet"] and citations[0]["score"] > 0
    assert "tortoise" in r.choices[0].message.content.lower()
    stream = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, stream=True,
                                            messages=[{"role": "user", "content": "What is the 2027 budget?"}],
                                            extra_body={"vector_store_ids": [store.id], "max_num_results": 2})
    chunks = list(stream)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    cited = final.model_extra["citations"]
    assert len(cited) == 2 and cited[0]["filename"] == "budget.pdf" and cited[0]["page"] == 2


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.docx", b"PK\x03\x04 not really", "unsupported"),
        ("broken.pdf", b"%PDF-1.7\n1 0 obj garbage", "pdf"),
        ("empty.txt", b"", "empty"),
    ],
)
def test_bad_files_fail_alone_with_a_clear_error(client, store, name, data, message) -> None:
    before = client.vector_stores.retrieve(store.id).file_counts.completed
    file_id = client.files.create(file=(name, data), purpose="assistants").id
    f = client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)
    assert f.status == "failed" and message in f.last_error.message.lower() and name in f.last_error.message
    after = client.vector_stores.retrieve(store.id)
    assert after.file_counts.completed == before and after.file_counts.failed >= 1
    client.vector_stores.files.delete(file_id=file_id, vector_store_id=store.id)


def test_bad_requests(client, server: Server, store) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.vector_stores.search(vector_store_id=store.id, query="")
    assert info.value.body["param"] == "query"
    with pytest.raises(openai.NotFoundError) as info:
        client.vector_stores.search(vector_store_id="vs_nope", query="x")
    assert info.value.body["code"] == "vector_store_not_found"
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=store.id, file_id="file-nope")
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(vector_store_id=store.id, query="x", filters={"type": "regex", "key": "a", "value": "b"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"vector_store_ids": ["vs_nope"]})


def test_deleting_a_file_removes_its_chunks_everywhere(client, tmp_path) -> None:
    fid = client.files.create(file=("ephemeral.txt", b"The secret word is marmalade."), purpose="assistants").id
    a = client.vector_stores.create(name="a", file_ids=[fid])
    b = client.vector_stores.create(name="b", file_ids=[fid])
    for vs in (a, b):
        assert client.vector_stores.search(vector_store_id=vs.id, query="marmalade").data
    assert client.files.delete(fid).deleted
    for vs in (a, b):
        assert client.vector_stores.search(vector_store_id=vs.id, query="marmalade", ranking_options={"ranker": "bm25"}).data == []
        assert client.vector_stores.retrieve(vs.id).file_counts.total == 0
    assert client.vector_stores.delete(b.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(b.id)


def test_models_lists_the_embedding_model(server: Server) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{server.api}/models").json()["data"]}
    assert cards["all-minilm-l6-v2"]["task"] == "embed" and cards[MODEL]["task"] == "generate"
