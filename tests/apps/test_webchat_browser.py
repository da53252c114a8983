"""The web chat in a real browser (Debian's chromium, driven by Playwright), against a real server."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from tests.server import Server, start_server

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium")]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
XSS = ('Here you go: <script>window.__xss = "script"</script> <img src=x onerror="window.__xss=\'img\'"> '
       '[click me](javascript:window.__xss="link") <a href="javascript:alert(1)">raw link</a> '
       '**bold** and [a real link](https://example.com) ![x](https://example.com/track.png?q=secret)\n'
       '```html\n<script>window.__xss="code"</script>\n```')
XSS_NAME = '<img src=y onerror="window.__xss=\'name\'">'



@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    s = start_server(tmp_path_factory.mktemp("webchat"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server: Server):  # type: ignore[no-untyped-def]
    # The page's Content-Security-Policy would block injected scripts on its own; bypassing it here makes the
    # XSS test prove that the renderer itself never creates live markup (and lets Playwright evaluate).
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield page
    context.close()
    assert errors == []


def _send(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#input", text)
    page.click("#send")


def test_send_stream_stop_and_reload(page, server: Server) -> None:
    assert page.locator("#model option").all_inner_texts() == ["smollm2-135m-instruct"]
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    _send(page, "What is the capital of France? Answer in one sentence.")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    reply = page.locator(".message.assistant").last
    assert "Paris" in reply.locator(".body").inner_text()
    assert "tok/s" in reply.locator(".stats").inner_text()

    # Regenerate replaces the last reply; Edit rewrites a user message and answers it afresh.
    reply.locator("button.regenerate").click()
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert page.locator(".message.user").count() == 1 and page.locator(".message.assistant").count() == 1
    assert "Paris" in page.locator(".message.assistant .body").inner_text()  # greedy: the same answer
    page.once("dialog", lambda d: d.accept("What is the capital of Italy? Answer in one sentence."))
    page.locator(".message.user button.edit").click()
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert page.locator(".message.user").inner_text().startswith("What is the capital of Italy?")
    assert page.locator(".message.assistant").count() == 1

    # Streaming, seen from the page: the reply grows, then Stop ends it early.
    _send(page, "Write a very long story about a dragon who learns to bake bread, with many chapters.")
    page.wait_for_function("document.querySelector('.message.assistant:last-of-type .body').innerText.length > 40",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    stopped = page.locator(".message.assistant").last
    assert "(stopped)" in stopped.locator(".stats").inner_text()
    partial = stopped.locator(".body").inner_text()

    # The conversation is on the server: reload the page and find it, with both exchanges.
    page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#conversations li").count() == 1
    assert "What is the capital of" in page.locator("#conversations li").inner_text()
    assert page.locator(".message.user").count() == 2 and page.locator(".message.assistant").count() == 2
    assert page.locator(".message.assistant").last.locator(".body").inner_text() == partial
    assert page.input_value("#temperature") == "0"


def test_model_output_renders_inert(page, server: Server) -> None:
    """Model output is untrusted: script tags, event handlers and javascript: links must do nothing."""
    conv = httpx.post(f"{server.url}/api/conversations", json={"title": "xss"}).json()
    httpx.put(f"{server.url}/api/conversations/{conv['id']}/messages",
              json={"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": XSS}]})
    page.evaluate(f"localStorage.setItem('lamina.conversation', {json.dumps(conv['id'])})")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    _assert_inert(page)

    # The same payload arriving as a stream, through the page's streaming path, with a tool call and a tool
    # result that carry it too (a tool's output is as untrusted as the model's).
    def fake_stream(route) -> None:  # type: ignore[no-untyped-def]
        events = [{"type": "tool_call", "id": "call_1", "name": XSS_NAME, "arguments": XSS},
                  {"type": "tool_result", "id": "call_1", "name": XSS_NAME, "result": XSS, "is_error": False}]
        events += [{"type": "delta", "content": XSS[i : i + 7]} for i in range(0, len(XSS), 7)]
        steps = [{"id": "call_1", "name": XSS_NAME, "arguments": XSS, "result": XSS, "is_error": False}]
        events.append({"type": "done", "title": "xss", "message": {"role": "assistant", "content": XSS,
                                                                   "meta": {"tools": steps, "completion_tokens": 9}}})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    page.route("**/reply", fake_stream)
    _send(page, "show me html")
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2")
    _assert_inert(page)
    tool = page.locator(".message.assistant").last.locator(".tool")
    assert tool.count() == 1
    tool.locator("summary").click()
    assert tool.locator("script, img, iframe, [onerror], a").count() == 0
    assert "<img src=x" in tool.locator("pre.result").inner_text() and XSS_NAME in tool.locator("summary").inner_text()


def _assert_inert(page) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    body = page.locator(".message.assistant").last.locator(".body")
    assert body.locator("script, img, iframe, [onerror]").count() == 0
    assert body.locator("a[href^='javascript']").count() == 0
    links = body.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com"
    text = body.inner_text()
    assert "<script>" in text and "onerror" in text and "javascript:" in text  # shown as text, not run
    assert body.locator("strong").inner_text() == "bold"
    code = body.locator("pre code")
    assert code.count() == 1 and "hljs" in (code.get_attribute("class") or "")  # highlighted, still text
    assert body.locator("pre button.copy-code").count() == 1


def test_conversations_rename_and_delete(page, server: Server) -> None:
    for title in ("first", "second"):
        httpx.post(f"{server.url}/api/conversations", json={"title": title})
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    item = page.locator("#conversations li", has_text="first")
    page.once("dialog", lambda d: d.accept("renamed one"))
    item.locator("button[title=Rename]").click()
    page.wait_for_selector("#conversations li:has-text('renamed one')")
    page.once("dialog", lambda d: d.accept())
    page.locator("#conversations li", has_text="second").locator("button[title=Delete]").click()
    page.wait_for_function("![...document.querySelectorAll('#conversations li')].some(li => li.innerText.includes('second'))")
    titles = [c["title"] for c in httpx.get(f"{server.url}/api/conversations").json()["data"]]
    assert "renamed one" in titles and "second" not in titles


def test_page_asks_for_the_key_when_one_is_configured(browser, tmp_path) -> None:
    s = start_server(tmp_path, "--api-key", "browser-key")
    try:
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "browser-key")
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready=true]")
        assert page.evaluate("localStorage.getItem('lamina.apiKey')") == "browser-key"
        assert page.locator("#model option").count() == 1
        context.close()
    finally:
        s.stop()


def test_upload_documents_pick_a_store_and_see_citations(page, server: Server, tmp_path) -> None:
    doc = tmp_path / "mascot.txt"
    doc.write_text("The Lamina project's mascot is a basalt tortoise named Quill. Quill enjoys reading manuals.")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.once("dialog", lambda d: d.accept("browser-docs"))
    page.set_input_files("#upload", str(doc))
    page.wait_for_function("document.querySelector('#status').innerText.includes('mascot.txt:')", timeout=60_000)
    assert "chunks" in page.inner_text("#status")
    assert "browser-docs (1 files)" in page.locator("#store option:checked").inner_text()
    _send(page, "What is the mascot of the Lamina project?")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    citations = page.locator(".message.assistant").last.locator(".citations li")
    assert citations.count() >= 1
    first = citations.first.inner_text()
    assert first.startswith("mascot.txt") and "basalt tortoise" in first and "score" in first
    # citations are kept with the conversation
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(".message.assistant").last.locator(".citations li").count() == citations.count()


def test_sampling_defaults_theme_copy_and_one_request_per_reply(page, server: Server) -> None:
    # SmolLM2's model card: temperature 0.2, top_p 0.9 (not 0.7, which makes it loop on a haiku)
    assert page.input_value("#temperature") == "0.2" and page.input_value("#top-p") == "0.9"
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(22, 23, 24)"
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "light"

    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    _send(page, "Say hello.")
    page.wait_for_selector(".message.assistant .stats", timeout=60_000)
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url.removeprefix(server.url)}"))
    _send(page, "Write a haiku about the sea, then explain it in one sentence.")
    page.wait_for_function("document.querySelectorAll('.message.assistant .stats').length === 2", timeout=60_000)
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    replies = [r for r in requests if r.endswith("/reply")]
    assert len(replies) == 1 and requests == replies, requests
    reply = page.locator(".message.assistant").last
    stats = reply.locator(".stats").inner_text()
    conv_id = page.evaluate("localStorage.getItem('lamina.conversation')")
    conv = httpx.get(f"{server.url}/api/conversations/{conv_id}").json()
    saved = conv["messages"][-1]
    assert conv["title"] == "Say hello." and len(conv["messages"]) == 4  # named by the server, no request for it
    assert saved["role"] == "assistant" and saved["content"].strip() and saved["meta"]["reply_id"]
    tokens = saved["meta"]["completion_tokens"]
    assert tokens > 5 and stats.startswith(f"{tokens} tokens") and "tok/s" in stats  # the engine's count, not chunks
    copy = reply.locator("footer button.copy")
    copy.click()
    page.wait_for_function("[...document.querySelectorAll('.message.assistant footer button.copy')].pop().textContent === 'Copied'")


def test_tools_from_an_mcp_server_in_the_web_chat(browser, tmp_path) -> None:
    """`lamina serve --mcp-config`: a conversation enables an MCP tool; the model calls it and the page shows the
    call and its result while the reply streams."""
    import sys

    from tests.apps.test_agent_tools import SERVER, write_config

    script, mark = tmp_path / "notes_server.py", tmp_path / "deleted"
    script.write_text(SERVER)
    config = write_config(tmp_path, {"notes": {"command": sys.executable, "args": [str(script), str(mark)], "tools": ["get_code"]}})
    s = start_server(tmp_path / "home", "--mcp-config", str(config))
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model option").all_inner_texts() == ["smollm2-135m-instruct"]  # the tool adapter is not a choice
        names = page.locator("#tools label").all_text_contents()
        assert any("notes_get_code (notes)" in n for n in names) and not any("delete" in n for n in names), names
        page.click("#tools-summary")
        page.check("#tools input[value=notes_get_code]")
        page.fill("#temperature", "0")
        page.dispatch_event("#temperature", "change")
        _send(page, "What is the code of the word lamina?")
        page.wait_for_selector(".message.assistant .tool", timeout=120_000)
        page.wait_for_selector("#send:not([hidden])", timeout=120_000)
        tool = page.locator(".message.assistant .tool").first
        assert "notes_get_code" in tool.locator("summary").inner_text() and "done" in tool.locator("summary").inner_text()
        tool.locator("summary").click()
        assert "ANIMAL-7" in tool.locator("pre.result").inner_text()
        assert "ANIMAL-7" in page.locator(".message.assistant .body").inner_text()
        page.reload()  # the calls are kept with the conversation
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator(".message.assistant .tool").count() >= 1
        assert page.locator("#tools input[value=notes_get_code]").is_checked()
        assert not mark.exists()
        context.close()
    finally:
        s.stop()


def test_reply_refuses_bad_input_before_streaming(server: Server) -> None:
    conv = httpx.post(f"{server.url}/api/conversations", json={"title": "bad"}).json()
    url = f"{server.url}/api/conversations/{conv['id']}/reply"
    user = [{"role": "user", "content": "hi"}]
    cases = [(f"{server.url}/api/conversations/conv_nope/reply", {"messages": user}, 404, "No conversation"),
             (url, {"messages": [{"role": "assistant", "content": "x"}]}, 400, "end with the user's message"),
             (url, {"messages": user, "tools": ["rm_rf"]}, 400, "no tool 'rm_rf'"),
             (url, {"messages": user, "tools": ["file_search"]}, 400, "file_search needs a store"),
             (url, {"messages": user, "temperature": 9}, 400, "temperature"), (url, {"messages": []}, 400, "messages")]
    for where, body, status, message in cases:
        r = httpx.post(where, json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        if message:
            assert message in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/api/conversations/{conv['id']}").json()["messages"] == []  # nothing stored
