"""Document loading: every supported type from real files, the errors a user can cause, and the offsets."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lamina.errors import InvalidRequestError, LaminaError
from lamina.foundation.documents import (
    SUPPORTED_SUFFIXES,
    Document,
    DocumentError,
    document_text,
    load_document,
)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, written object by object with its xref table: one page per string, each line
    of a string drawn with Helvetica (`BT /F1 12 Tf 72 720 Td (line) Tj ... ET`); "" makes a blank page."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{kids}] /Count {n} >>",
        3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for i, text in enumerate(pages):
        shows = " T* ".join(f"({_escape(line)}) Tj" for line in text.split("\n"))
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {shows} ET" if text else ""
        objects[4 + 2 * i] = (
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
        )
        objects[5 + 2 * i] = f"<< /Length {len(stream.encode('latin-1'))} >>\nstream\n{stream}\nendstream"
    out = bytearray(b"%PDF-1.4\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref = len(out)
    size = max(objects) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    for number in range(1, size):
        out += f"{offsets[number]:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypt_pdf(pdf: bytes, user_password: str) -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf)))
    # RC4 needs no crypto package (AES would need `cryptography`, which is not installed).
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def assert_offsets(doc: Document) -> None:
    """Each section sits at its `start` in document_text, and sections are "\\n\\n"-separated."""
    full = document_text(doc)
    for section in doc.sections:
        assert full[section.start : section.start + len(section.text)] == section.text
    assert len(full) == sum(len(s.text) for s in doc.sections) + 2 * (len(doc.sections) - 1)


# --- plain text and markdown ------------------------------------------------------------------------------


def test_txt_is_one_cleaned_section_with_file_facts(tmp_path: Path) -> None:
    raw = "  Title\r\n\r\n\r\n\r\nFirst\u00a0para  graph.\tTabbed.   \r\nSecond line\u200b.\n"
    path = write(tmp_path, "notes.txt", raw)
    doc = load_document(path)
    assert (doc.kind, doc.filename, doc.path) == ("txt", "notes.txt", str(path))
    assert doc.n_bytes == len(raw.encode())
    assert doc.sha256 == hashlib.sha256(raw.encode()).hexdigest()
    [section] = doc.sections
    assert section.text == "Title\n\nFirst para graph. Tabbed.\nSecond line."
    assert (section.page, section.start, section.attributes) == (None, 0, {})
    assert document_text(doc) == section.text


@pytest.mark.parametrize("name", ["README.md", "guide.markdown", "UPPER.MD"])
def test_markdown_is_kept_as_text(tmp_path: Path, name: str) -> None:
    md = "# Heading\n\nSome *emphasis* and a [link](https://example.com).\n\n```python\ndef f():\n    return 1\n```\n"
    doc = load_document(write(tmp_path, name, md))
    assert doc.kind == "md"
    text = document_text(doc)
    assert text.startswith("# Heading\n\nSome *emphasis* and a [link](https://example.com).")
    assert "def f():\n    return 1" in text  # code indentation survives cleaning


def test_utf8_bom_and_utf16_are_decoded(tmp_path: Path) -> None:
    assert document_text(load_document(write(tmp_path, "bom.txt", b"\xef\xbb\xbfcaf\xc3\xa9"))) == "café"
    utf16 = "naïve text".encode("utf-16")  # with its BOM, as Windows editors save "Unicode"
    assert document_text(load_document(write(tmp_path, "u16.txt", utf16))) == "naïve text"


# --- HTML -------------------------------------------------------------------------------------------------

HTML = """<!DOCTYPE html>
<html><head>
  <title>  Fish &amp; Chips | Example Site </title>
  <meta charset="utf-8"><link rel="stylesheet" href="x.css">
  <style>body { color: red; } .STYLE-LEAK {}</style>
  <script>var SCRIPT_LEAK = "<p>not text</p>";</script>
</head>
<body>
  <header><a href="/">SITE-HEADER-LEAK</a></header>
  <nav><ul><li>NAV-LEAK one</li><li><a href="/b">NAV-LEAK two</a></li></ul></nav>
  <!-- COMMENT-LEAK -->
  <main>
    <article>
      <header><h1>Fish &amp; Chips &lt;tasty&gt;</h1><p class="byline">By Ann&nbsp;Lee</p></header>
      <p>Cod   in
         batter&#8212;with <b>salt</b> &amp; vinegar.</p>
      <p>Second<br>line after a break.</p>
      <ul><li>Item one</li><li>Item two</li></ul>
      <div hidden>HIDDEN-LEAK</div>
      <span style="display: none">DISPLAY-NONE-LEAK</span>
      <pre>  keep   this
    spacing</pre>
      <table><tr><th>Name</th><th>Price</th></tr><tr><td>Cod</td><td>9</td></tr></table>
      <noscript>NOSCRIPT-LEAK</noscript>
      <template><p>TEMPLATE-LEAK</p></template>
      <svg viewBox="0 0 10 10"><title>SVG-TITLE-LEAK</title><text>SVG-LEAK</text></svg>
      <footer>Article footnote kept.</footer>
    </article>
  </main>
  <aside>ASIDE-LEAK</aside>
  <form><label>FORM-LEAK</label><input name="q"></form>
  <footer>SITE-FOOTER-LEAK &copy; 2026</footer>
</body></html>
"""


def test_html_keeps_visible_content_only(tmp_path: Path) -> None:
    doc = load_document(write(tmp_path, "page.html", HTML))
    assert doc.kind == "html"
    [section] = doc.sections
    text = section.text
    assert "LEAK" not in text, text
    assert text.startswith("Fish & Chips <tasty>\n\nBy Ann Lee\n\nCod in batter—with salt & vinegar.")
    assert "Second\nline after a break." in text
    assert "Item one\nItem two" in text
    assert "\n\n  keep this\n    spacing\n\n" in text  # <pre> keeps its lines and indentation
    assert "Name Price\nCod 9" in text
    assert text.endswith("Article footnote kept.")  # an article's own footer is content
    assert section.attributes == {"title": "Fish & Chips | Example Site"}  # the title is not in the text


def test_html_page_wrapped_in_a_form_keeps_its_text(tmp_path: Path) -> None:
    page = "<html><body><form id='aspnet'><h1>Report</h1><p>All the content.</p></form></body></html>"
    assert document_text(load_document(write(tmp_path, "webforms.htm", page))) == "Report\n\nAll the content."


def test_html_without_closing_head_and_non_utf8_charset(tmp_path: Path) -> None:
    page = '<html><head><meta charset="windows-1252"><title>T</title><body><p>Caf\xe9 \x93quoted\x94</p>'
    doc = load_document(write(tmp_path, "legacy.html", page.encode("latin-1")))
    assert document_text(doc) == "Café “quoted”"


def test_html_with_only_a_title_uses_the_title(tmp_path: Path) -> None:
    doc = load_document(write(tmp_path, "t.html", "<html><head><title>Only title</title></head><body><script>x</script></body>"))
    assert document_text(doc) == "Only title"


# --- PDF --------------------------------------------------------------------------------------------------


def test_pdf_has_one_section_per_page_with_text(tmp_path: Path) -> None:
    pdf = make_pdf(["Hello page one.\nSecond line (with parens).", "", "Page three, café."])
    doc = load_document(write(tmp_path, "report.pdf", pdf))
    assert doc.kind == "pdf"
    assert [(s.page, s.text) for s in doc.sections] == [
        (1, "Hello page one.\nSecond line (with parens)."),
        (3, "Page three, café."),  # the blank page 2 is skipped, numbering is physical
    ]
    assert_offsets(doc)
    assert doc.sections[1].start == len(doc.sections[0].text) + 2


def test_encrypted_pdf_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "secret.pdf", encrypt_pdf(make_pdf(["Top secret."]), user_password="pw"))
    with pytest.raises(DocumentError, match=r"'secret.pdf' is an encrypted PDF.*decrypt it first") as info:
        load_document(path)
    assert "\n" not in info.value.message


def test_pdf_with_only_an_owner_password_opens(tmp_path: Path) -> None:
    path = write(tmp_path, "locked.pdf", encrypt_pdf(make_pdf(["Readable text."]), user_password=""))
    assert document_text(load_document(path)) == "Readable text."


@pytest.mark.parametrize(
    "data",
    [
        make_pdf(["Some text here."])[:150],  # truncated
        b"%PDF-1.7\n" + bytes(range(256)) * 8,  # a header and garbage
    ],
    ids=["truncated", "garbage"],
)
def test_corrupt_pdf_is_a_document_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(DocumentError, match=r"'bad.pdf' is a corrupt or unreadable PDF"):
        load_document(write(tmp_path, "bad.pdf", data))


def test_pdf_suffix_on_something_else(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"'fake.pdf' is not a PDF"):
        load_document(write(tmp_path, "fake.pdf", "just text"))


def test_pdf_without_text_points_at_ocr(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"'scan.pdf' has no text after cleaning.*OCR"):
        load_document(write(tmp_path, "scan.pdf", make_pdf(["", ""])))


# --- JSONL ------------------------------------------------------------------------------------------------


def test_jsonl_records_become_sections_with_attributes(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "text": "First  record.", "score": 0.5, "n": 3, "ok": True, "tags": ["x"], "meta": {"k": 1}, "none": None}),
        "",  # blank lines are skipped but still counted, so `row` is the line an editor shows
        json.dumps({"content": "From content.", "text": 7, "lang": "en"}),
        json.dumps({"text": "Text wins.", "content": "not this"}),
        json.dumps({"page_content": "LangChain export.", "metadata": {"source": "s"}}),
        json.dumps("A bare string line."),
        json.dumps({"text": "   ", "id": "blank"}),  # no text after cleaning: no section
    ]
    doc = load_document(write(tmp_path, "data.jsonl", "\n".join(lines) + "\n"))
    assert doc.kind == "jsonl"
    assert [(s.text, s.attributes) for s in doc.sections] == [
        ("First record.", {"id": "a", "score": 0.5, "n": 3, "ok": True, "row": 1}),
        ("From content.", {"text": 7, "lang": "en", "row": 3}),
        ("Text wins.", {"content": "not this", "row": 4}),
        ("LangChain export.", {"row": 5}),
        ("A bare string line.", {"row": 6}),
    ]
    assert all(s.page is None for s in doc.sections)
    assert_offsets(doc)


def test_jsonl_line_with_unicode_line_separator_is_one_record(tmp_path: Path) -> None:
    record = json.dumps({"text": "one\u2028record"}, ensure_ascii=False)
    doc = load_document(write(tmp_path, "ls.jsonl", record + "\r\n"))
    assert [s.text for s in doc.sections] == ["one\nrecord"]


def test_jsonl_bad_line_is_named(tmp_path: Path) -> None:
    body = '{"text": "ok"}\n{"text": "ok too"}\n{"text": broken}\n'
    with pytest.raises(DocumentError, match=r"'bad.jsonl' line 3 is not valid JSON"):
        load_document(write(tmp_path, "bad.jsonl", body))


def test_jsonl_record_without_text_is_named(tmp_path: Path) -> None:
    body = '{"text": "ok"}\n{"title": "no text", "id": 2}\n'
    with pytest.raises(DocumentError, match=r"'notext.jsonl' line 2 has no text field.*'text', 'content'.*\['id', 'title'\]"):
        load_document(write(tmp_path, "notext.jsonl", body))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"line 1 is a JSON list, not an object"):
        load_document(write(tmp_path, "list.jsonl", "[1, 2]\n"))


# --- CSV --------------------------------------------------------------------------------------------------


def test_csv_with_a_text_column(tmp_path: Path) -> None:
    body = 'id,Text,author\r\n1,"Hello, world.",ann\r\n2,"Two\nlines",bob\r\n3,,carl\r\n4,Last.\r\n'
    doc = load_document(write(tmp_path, "rows.csv", body))
    assert doc.kind == "csv"
    assert [(s.text, s.attributes) for s in doc.sections] == [
        ("Hello, world.", {"id": "1", "author": "ann", "row": 1}),
        ("Two\nlines", {"id": "2", "author": "bob", "row": 2}),  # a quoted newline stays in one row
        ("Last.", {"id": "4", "author": "", "row": 4}),  # row 3 has no text; a short row fills with ""
    ]
    assert_offsets(doc)


def test_csv_without_a_text_column_spells_out_every_column(tmp_path: Path) -> None:
    body = "name,city,age\nAnn,Oslo,31\nBob,,40\n"
    doc = load_document(write(tmp_path, "people.csv", body))
    assert [(s.text, s.attributes) for s in doc.sections] == [
        ("name: Ann\ncity: Oslo\nage: 31", {"row": 1}),
        ("name: Bob\nage: 40", {"row": 2}),
    ]


# --- errors common to every type -------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"'empty.txt' is empty \(0 bytes\)"):
        load_document(write(tmp_path, "empty.txt", b""))
    with pytest.raises(DocumentError, match=r"'blank.md' has no text after cleaning"):
        load_document(write(tmp_path, "blank.md", " \n\t\u200b\u00a0\r\n"))


def test_unsupported_type_lists_the_supported_suffixes(tmp_path: Path) -> None:
    with pytest.raises(DocumentError) as info:
        load_document(write(tmp_path, "letter.docx", b"PK\x03\x04"))
    error = info.value
    assert isinstance(error, LaminaError) and isinstance(error, InvalidRequestError)
    assert (error.status_code, error.error_type, error.code) == (400, "invalid_request_error", "unsupported_document")
    assert "'letter.docx'" in error.message and "'.docx'" in error.message
    assert all(suffix in error.message for suffix in SUPPORTED_SUFFIXES)
    assert error.to_dict()["error"]["code"] == "unsupported_document"
    with pytest.raises(DocumentError, match=r"'Makefile': unsupported file type '\(no suffix\)'"):
        load_document(tmp_path / "Makefile", data=b"all:")


def test_non_utf8_text_says_so(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"'latin.txt' is not UTF-8 text \(byte 0xe9 at offset 3\).*UTF-8") as info:
        load_document(write(tmp_path, "latin.txt", "café au lait".encode("latin-1")))
    assert info.value.code == "unreadable_document"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"cannot read the file"):
        load_document(tmp_path / "nope.txt")


def test_uploaded_bytes_need_no_file(tmp_path: Path) -> None:
    data = b'{"text": "uploaded record", "user": "u1"}\n'
    doc = load_document("uploads/file-123", data=data, filename="batch.jsonl")
    assert not (tmp_path / "uploads").exists()
    assert (doc.path, doc.filename, doc.kind, doc.n_bytes) == ("uploads/file-123", "batch.jsonl", "jsonl", len(data))
    assert doc.sha256 == hashlib.sha256(data).hexdigest()
    assert [(s.text, s.attributes) for s in doc.sections] == [("uploaded record", {"user": "u1", "row": 1})]
    # Without `filename`, the path's name gives the type; the bytes win over any file at the path.
    write(tmp_path, "x.txt", "on disk")
    assert document_text(load_document(tmp_path / "x.txt", data=b"in memory")) == "in memory"


def test_chunking_names_live_in_chunking_and_documents_does_not_import_it() -> None:
    # chunking imports documents, never the other way round: no circle, and no re-export to keep in step.
    code = ("import sys, lamina.foundation.documents as d; "
            "print('lamina.foundation.chunking' in sys.modules, hasattr(d, 'chunk_document'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    from lamina.foundation import chunking

    assert {"Chunk", "chunk_document", "dedupe_chunks"} <= set(chunking.__all__)
    with pytest.raises(ImportError):
        from lamina.foundation.documents import chunk_document  # noqa: F401
