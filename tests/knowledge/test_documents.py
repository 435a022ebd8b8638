"""Reading documents: every format from bytes built here, encodings, and every kind of bad file as one clear line."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import pickle
import random
import zipfile
from pathlib import Path

import pytest

from callbot_core.errors import InvalidInput
from callbot_core.knowledge.documents import FORMATS, BadDocument, Document, Section, read_document, read_path

MB = 1024 * 1024
LIMIT = 20 * MB
NAMES = "Zoë Müller lives at Straße 5."

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(256)) * 4
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(50)
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(200)
GZIP = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(50)


def read(name: str, data: bytes) -> Document:
    return read_document(name, data, max_bytes=LIMIT)


def refused(name: str, data: bytes, *, max_bytes: int = LIMIT) -> str:
    """The one-line message a bad file gets; it must be a BadDocument and carry no newline."""
    with pytest.raises(BadDocument) as caught:
        read_document(name, data, max_bytes=max_bytes)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert message.endswith(f": {caught.value.reason}")
    return message


def texts(document: Document) -> str:
    return "\n".join(section.text for section in document.sections)


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF: one page per string, its lines in Helvetica (WinAnsi), with correct xref offsets."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(len(pages))), len(pages)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, text in enumerate(pages):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
            b" /Contents %d 0 R >>" % (5 + 2 * i)
        )
        ops = [b"BT", b"/F1 12 Tf", b"14 TL", b"72 720 Td"]
        for line in text.split("\n") if text else []:
            escaped = line.encode("cp1252").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
            ops.append(b"(" + escaped + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def make_docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_paragraph("Welcome to the clinic.")
    document.add_heading("Fees", level=1)
    document.add_paragraph("Visits are paid at the desk.")
    document.add_heading("Insurance", level=2)
    document.add_paragraph("We bill these plans:")
    table = document.add_table(rows=3, cols=3)
    for row, values in zip(
        table.rows, [("Plan", "Price", "Notes"), ("Basic", "10 EUR", ""), ("Plus", "25 EUR", "x")], strict=True
    ):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph("Ask about other plans.")
    document.add_heading("Contact", level=1)
    document.add_paragraph(f"Call {NAMES}")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


# -- text and encodings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        NAMES.encode("utf-8"),
        codecs.BOM_UTF8 + NAMES.encode("utf-8"),
        NAMES.encode("utf-16"),  # with a BOM (little-endian here)
        codecs.BOM_UTF16_BE + NAMES.encode("utf-16-be"),
        codecs.BOM_UTF16_LE + NAMES.encode("utf-16-le"),
        NAMES.encode("utf-16-le"),  # Windows "Unicode" without a BOM
        NAMES.encode("cp1252"),
        NAMES.encode("latin-1"),
    ],
    ids=["utf8", "utf8-bom", "utf16", "utf16-be-bom", "utf16-le-bom", "utf16-le-no-bom", "cp1252", "latin1"],
)
def test_text_comes_out_right_from_every_encoding(data: bytes) -> None:
    document = read("names.txt", data)
    assert document.sections == [Section(NAMES)]
    assert document.format == "txt"


def test_a_long_western_text_is_cp1252_and_cyrillic_is_recognised() -> None:
    german = "Größe und Maße: Zoë Müller wohnt in der Straße am Fluß, süß und schön. " * 20
    assert texts(read("de.txt", german.encode("cp1252"))) == german.strip()
    # cp1252 has “smart quotes” and the euro sign where Latin-1 has control codes.
    assert texts(read("q.txt", "“Quoted” – 5 €".encode("cp1252"))) == "“Quoted” – 5 €"
    russian = "Привет, мир! Это длинный текст о правилах оплаты и страховке клиники. " * 10
    assert texts(read("ru.txt", russian.encode("cp1251"))) == russian.strip()
    # A UTF-8 file cut inside its last character stays UTF-8.
    assert texts(read("cut.txt", (NAMES * 3).encode("utf-8") + "ü".encode()[:1])).startswith(NAMES)


def test_whitespace_is_normalised_but_paragraphs_kept() -> None:
    data = b"  One\t\t two   three \x00four\x07\r\n\r\n\r\n\r\nPara  two\x0bline\n\n\n\nend  "
    assert texts(read("w.txt", data)) == "One two three four\n\nPara two\nline\n\nend"


def test_document_has_name_without_folders_and_hash_of_the_bytes() -> None:
    data = b"hello"
    document = read("uploads/2024/notes.TXT", data)
    assert (document.name, document.format, document.content_hash) == (
        "notes.TXT",
        "txt",
        hashlib.sha256(data).hexdigest(),
    )
    assert read("C:\\Users\\me\\notes.md", data).name == "notes.md"


def test_formats_are_the_six() -> None:
    assert FORMATS == ("txt", "md", "html", "pdf", "docx", "csv")


# -- markdown --------------------------------------------------------------------------------------------------------


def test_markdown_sections_follow_headings_but_not_in_code() -> None:
    md = (
        "Intro text.\n\n# Fees\n\nPaid at the desk.\n\n## Insurance ##\n\nWe bill plans.\n\n```python\n"
        "# not a heading\nprint(1)\n```\n\n### Basic\n\nTen euros.\n\n## Discounts\n\nStudents.\n\n"
        "# Contact\n\n#hashtag is text\n\n~~~\n## also code\n~~~\n"
    )
    sections = read("faq.md", md.encode()).sections
    assert [(s.heading, s.text.splitlines()[0]) for s in sections] == [
        (None, "Intro text."),
        ("Fees", "Paid at the desk."),
        ("Fees > Insurance", "We bill plans."),
        ("Fees > Insurance > Basic", "Ten euros."),
        ("Fees > Discounts", "Students."),
        ("Contact", "#hashtag is text"),
    ]
    assert "# not a heading" in sections[2].text
    assert "## also code" in sections[5].text
    assert all(s.page is None for s in sections)


# -- html ------------------------------------------------------------------------------------------------------------

HOSTILE_ARTICLE = """<!doctype html><html><head><title>Clinic</title><style>body {color: red}</style>
<script>alert(1)</script></head>
<body onload="alert(4)">
<header><div class="logo">ClinicCorp</div><nav>Home | About</nav></header>
<nav>Home | About</nav>
<main><article>
<h1>Opening hours</h1>
<p>The clinic opens at eight in the morning on weekdays and at nine on Saturdays, for all patients.
Please bring your insurance card to every visit, because we bill the plan directly.</p>
<p>Our staff can help with <a href="javascript:alert(2)">x</a> forms, and parking is free behind the building
for the whole duration of the visit.<img src="nope.png" onerror="alert(3)"></p>
<h2>Holidays</h2>
<p>On public holidays the clinic stays closed; an emergency number is on the answering machine message.
For urgent questions outside opening hours, call the hospital switchboard instead of the front desk.</p>
<script>document.write("alert(5)")</script>
<noscript>alert(6) enable scripts</noscript>
</article></main>
<aside>Related: alert(7)</aside>
<footer>Copyright ClinicCorp | Imprint | Privacy</footer>
<iframe src="javascript:alert(8)"></iframe><template><p>alert(9)</p></template>
</body></html>"""


@pytest.mark.parametrize("page", ["article", "short"])
def test_html_keeps_the_article_and_drops_scripts_navigation_and_boilerplate(page: str) -> None:
    html = HOSTILE_ARTICLE
    if page == "short":  # too short for trafilatura: the lxml fallback must be as strict
        html = html.replace(
            html[html.index("<p>The clinic") : html.index("<h2>")],
            '<p>Open at eight. <a href="javascript:alert(2)">x</a><img onerror="alert(3)"></p>',
        ).replace(html[html.index("<p>On public") : html.index("<script>document")], "<p>Closed on holidays.</p>")
    sections = read("clinic.html", html.encode()).sections
    everything = "\n".join(f"{s.heading}\n{s.text}" for s in sections)
    for forbidden in ("alert(", "javascript:", "onerror", "Home | About", "color: red", "Copyright", "Related"):
        assert forbidden not in everything, forbidden
    if page == "article":
        assert "opens at eight in the morning" in everything and "parking is free" in everything
        assert any(s.heading and s.heading.endswith("Holidays") and "public holidays" in s.text for s in sections)
    else:
        assert [(s.heading, s.text) for s in sections] == [
            ("Opening hours", "Open at eight. x"),
            ("Opening hours > Holidays", "Closed on holidays."),
        ]


def test_html_tables_lists_and_charset() -> None:
    html = (
        '<html><head><meta charset="windows-1252"></head><body><h2>Prices</h2><table><tr><th>Plan</th><th>Price</th>'
        "</tr><tr><td>Basic</td><td><p>10</p><p>EUR</p></td></tr></table><ul><li>Stra\xdfe</li><li>Zo\xeb</li></ul>"
        "</body></html>"
    ).encode("cp1252")
    [section] = read("p.html", html).sections
    assert section.heading == "Prices"
    assert section.text == "Plan | Price\nBasic | 10 EUR\n\nStraße\nZoë"


# -- pdf -------------------------------------------------------------------------------------------------------------


def test_pdf_pages_become_sections_with_page_numbers() -> None:
    data = make_pdf(["Fees are due monthly.\nSecond line", "", f"Page three: {NAMES}"])
    document = read("fees.pdf", data)
    assert document.format == "pdf"
    assert [s.page for s in document.sections] == [1, 3]  # the empty page is skipped
    assert "Fees are due monthly." in document.sections[0].text and "Second line" in document.sections[0].text
    assert NAMES in document.sections[1].text
    # PDF readers allow junk before the header.
    assert read("junk.pdf", b"X-Mailer: junk\r\n" + data).sections == document.sections


def test_bad_pdfs_are_refused_in_one_line() -> None:
    data = make_pdf(["Hello world", "Second page"])
    assert refused("fees.pdf", JPEG) == "fees.pdf: not a PDF (the bytes are a JPEG image)"
    assert refused("fees.pdf", b"hello, I am text") == "fees.pdf: not a PDF"
    assert refused("fees.pdf", data[: len(data) // 2]) == "fees.pdf: corrupt or truncated PDF"
    assert refused("fees.pdf", data[:-30]) == "fees.pdf: corrupt or truncated PDF"
    assert refused("fees.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n") == (
        "fees.pdf: corrupt or truncated PDF"
    )
    assert refused("scan.pdf", make_pdf(["", ""])) == "scan.pdf: no text found (a scanned PDF?)"


def test_encrypted_pdfs() -> None:
    from pypdf import PdfReader, PdfWriter

    def encrypted(user_password: str) -> bytes:
        writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["Secret fees"]))))
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
        buffer = io.BytesIO()
        writer.write(buffer)
        return buffer.getvalue()

    assert refused("locked.pdf", encrypted("secret")) == "locked.pdf: encrypted PDF"
    # Only an owner password ("no copying"): every reader opens it, so do we.
    assert texts(read("open.pdf", encrypted(""))) == "Secret fees"


# -- docx ------------------------------------------------------------------------------------------------------------


def test_docx_keeps_body_order_headings_and_table_rows() -> None:
    document = read("clinic.docx", make_docx())
    assert document.format == "docx"
    assert [(s.heading, s.text) for s in document.sections] == [
        (None, "Welcome to the clinic."),
        ("Fees", "Visits are paid at the desk."),
        (
            "Fees > Insurance",
            "We bill these plans:\n\nPlan | Price | Notes\nBasic | 10 EUR |\nPlus | 25 EUR | x"
            "\n\nAsk about other plans.",
        ),
        ("Contact", f"Call {NAMES}"),
    ]


def test_bad_docx_files_are_refused_in_one_line() -> None:
    not_word = io.BytesIO()
    with zipfile.ZipFile(not_word, "w") as archive:
        archive.writestr("hello.txt", "not a Word document")
    data = make_docx()
    assert refused("a.docx", not_word.getvalue()) == "a.docx: not a Word document (.docx)"
    assert refused("a.docx", b"plain text, not a zip") == "a.docx: not a Word document (.docx)"
    assert refused("a.docx", data[: len(data) // 2]) == "a.docx: not a Word document (.docx)"
    assert refused("a.docx", make_pdf(["x"])) == "a.docx: not a Word document (.docx; the bytes are a PDF)"
    old_word = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500)
    assert refused("a.docx", old_word) == (
        "a.docx: not a Word document (.docx; the bytes are an old Word, Excel or PowerPoint file)"
    )


def test_a_docx_that_unpacks_to_far_more_than_the_limit_is_refused() -> None:
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", b" " * (12 * MB))
    assert refused("bomb.docx", bomb.getvalue(), max_bytes=MB) == (
        "bomb.docx: too large once unpacked (12 MB; the limit is 10 MB)"
    )


# -- csv -------------------------------------------------------------------------------------------------------------


def test_csv_rows_are_lines_with_their_header() -> None:
    data = "name;city;note\nZoë Müller;Straße 5;\n\nAl;Rome;has; semicolons\n".encode("cp1252")
    [section] = read("people.csv", data).sections
    assert section.text == "name: Zoë Müller; city: Straße 5\nname: Al; city: Rome; note: has; column 4: semicolons"


def test_csv_groups_rows_into_sections_and_reads_huge_fields() -> None:
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["id", "text"])
    writer.writerows([i, f"row {i}"] for i in range(120))
    writer.writerow([999, "y" * (131_072 + 10)])  # over csv's default field limit
    sections = read("rows.csv", rows.getvalue().encode()).sections
    assert [s.text.count("\n") + 1 for s in sections] == [50, 50, 21]
    assert sections[0].text.startswith("id: 0; text: row 0\nid: 1; text: row 1")
    assert sections[-1].text.endswith("id: 999; text: " + "y" * (131_072 + 10))


def test_a_csv_with_only_a_header_is_refused() -> None:
    assert refused("h.csv", b"id,name\n") == "h.csv: no rows below the header"
    assert refused("h.csv", b",,\n, ,\n") == "h.csv: no text found"


# -- bad files of any kind -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("photo.txt", PNG, "photo.txt: not a text file (the bytes are a PNG image)"),
        ("anim.md", GIF, "anim.md: not a text file (the bytes are a GIF image)"),
        ("data.csv", b"PK\x03\x04" + bytes(100), "data.csv: not a text file (the bytes are a ZIP archive)"),
        ("page.html", make_pdf(["x"]), "page.html: not an HTML file (the bytes are a PDF)"),
        ("prog.txt", ELF, "prog.txt: not a text file (the bytes are an ELF executable)"),
        ("log.csv", GZIP, "log.csv: not a text file (the bytes are a gzip archive)"),
        ("notes.txt", random.Random(3).randbytes(4000), "notes.txt: not a text file (binary content)"),
        ("nuls.md", b"a" + bytes(1000), "nuls.md: not a text file (binary content)"),
        ("empty.txt", b"", "empty.txt: empty file"),
        ("blank.md", b" \r\n\t \n", "blank.md: empty file"),
        ("blank16.txt", codecs.BOM_UTF16_LE + " \n ".encode("utf-16-le"), "blank16.txt: empty file"),
        ("empty.pdf", b"", "empty.pdf: empty file"),
        ("empty.docx", b"", "empty.docx: empty file"),
        ("notes.xyz", b"x", "notes.xyz: unsupported file type '.xyz' (supported: txt, md, html, pdf, docx, csv)"),
        ("Makefile", b"x", "Makefile: unsupported file type (no extension; supported: txt, md, html, pdf, docx, csv)"),
        ("evil\nname\x1b[31m.txt", b"", "evil name [31m.txt: empty file"),
    ],
)
def test_bad_files_get_one_line_naming_file_and_reason(name: str, data: bytes, message: str) -> None:
    assert refused(name, data) == message


def test_too_large_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert refused("big.txt", b"x" * (21 * MB)) == "big.txt: too large (21 MB; the limit is 20 MB)"
    assert refused("big.txt", b"x" * (LIMIT + 1)) == "big.txt: too large (20.1 MB; the limit is 20 MB)"
    assert (
        refused("small.txt", b"x" * 3000, max_bytes=1000) == "small.txt: too large (0.0029 MB; the limit is 0.0009 MB)"
    )

    path = tmp_path / "huge.pdf"
    with path.open("wb") as file:
        file.truncate(64 * MB)  # sparse: nothing written
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("read a file it should have refused"))
    with pytest.raises(BadDocument, match=r"^huge\.pdf: too large \(64 MB; the limit is 20 MB\)$"):
        read_path(path, max_bytes=LIMIT)


def test_read_path(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_bytes("# Fees\nTen €".encode())
    document = read_path(tmp_path / "notes.md", max_bytes=LIMIT)
    assert (document.name, document.sections) == ("notes.md", [Section("Ten €", heading="Fees")])
    with pytest.raises(BadDocument, match=r"^gone\.txt: no such file$"):
        read_path(tmp_path / "gone.txt", max_bytes=LIMIT)
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(BadDocument, match=r"^folder\.txt: not a regular file$"):
        read_path(tmp_path / "folder.txt", max_bytes=LIMIT)
    with pytest.raises(BadDocument, match=r"^x\.exe: unsupported file type"):
        read_path(tmp_path / "x.exe", max_bytes=LIMIT)


def test_bad_document_is_invalid_input_and_survives_pickling() -> None:
    error = BadDocument("fees.pdf", "encrypted PDF")
    assert isinstance(error, InvalidInput)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.name, copy.reason, str(copy)) == ("fees.pdf", "encrypted PDF", "fees.pdf: encrypted PDF")


def test_mangled_files_give_a_document_or_bad_document_never_anything_else() -> None:
    rng = random.Random(1234)
    html = HOSTILE_ARTICLE.encode()
    originals = {
        "x.pdf": make_pdf(["Hello there", "Page two"]),
        "x.docx": make_docx(),
        "x.html": html,
        "x.md": b"# A\n\ntext\n```\ncode",
        "x.csv": b'a,b\n1,"2\n3,4\n',
        "x.txt": NAMES.encode("utf-16"),
    }
    for name, original in originals.items():
        for attempt in range(25):
            data = bytearray(original)
            if attempt % 2:
                data = data[: rng.randrange(len(data))]
            for _ in range(rng.randint(1, 20)):
                at = rng.randrange(len(data) + 1)
                operation = rng.choice(("insert", "delete", "change"))
                if operation == "insert" or at == len(data):
                    data[at:at] = bytes([rng.randrange(256)])
                elif operation == "delete":
                    del data[at]
                else:
                    data[at] = rng.randrange(256)
            try:
                document = read(name, bytes(data))
            except BadDocument as exc:
                assert "\n" not in str(exc) and str(exc).startswith(f"{name}: ")
            else:
                assert document.sections and all(s.text.strip() == s.text and s.text for s in document.sections)
