"""Documents in: a file's bytes become plain-text sections (with page numbers and heading paths), or one BadDocument.

The format comes from the extension and is then checked against the bytes' magic numbers, so a JPEG renamed .pdf is
refused by what it is instead of surfacing as a parser error. Every reader turns whatever its library raises into
BadDocument: any upload at all gives the caller one line to show, never a traceback.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import logging
import math
import re
import stat
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callbot_core.errors import InvalidInput

FORMATS: tuple[str, ...] = ("txt", "md", "html", "pdf", "docx", "csv")
# Other extensions the same formats go by.
ALIASES = {"htm": "html", "markdown": "md", "text": "txt"}

_log = logging.getLogger(__name__)

_MB = 1024 * 1024  # the settings' knowledge_max_file_mb counts in these
_ROWS_PER_SECTION = 50  # CSV rows per Section: chunking then never has to split one huge section
# csv.Sniffer's quote guess is quadratic: 64 KB of text with apostrophes took 5.7 s here, 8 KB 0.07 s. A hundred
# lines or so say the delimiter as well.
_SNIFF_CHARS = 8 * 1024
_DELIMITERS = ",;\t|"
# A .docx unpacks to at most this many times the file limit: python-docx loads every part into memory.
_DOCX_UNPACK_FACTOR = 10
# Up to this many bytes of junk may precede %PDF- (PDF readers allow it; some mail gateways add a line).
_PDF_JUNK = 1024


class BadDocument(InvalidInput):
    """A file that cannot be read as a document. str(exc) is one line: "{name}: {reason}"."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(_one_line(f"{name}: {reason}"))

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call BadDocument(message) on unpickling (multiprocessing, job queues) and fail.
        return (type(self), (self.name, self.reason))


@dataclass(frozen=True, slots=True)
class Section:
    text: str
    page: int | None = None  # 1-based page number (pdf only)
    heading: str | None = None  # headings above this text, joined " > " (md, html, docx)


@dataclass(frozen=True, slots=True)
class Document:
    name: str  # the file name as given, without folders
    format: str  # one of FORMATS
    content_hash: str  # sha256 hex of the raw bytes
    sections: list[Section]  # in document order, no empty sections


def read_document(name: str, data: bytes, *, max_bytes: int) -> Document:
    """Read a document from its bytes; `name` (its extension) says which format to expect."""
    name = _base_name(name)
    fmt = _format_of(name)
    _check_size(name, len(data), max_bytes)
    if not data or data.isspace():
        raise BadDocument(name, "empty file")
    _check_magic(name, fmt, data)
    reader = _READERS[fmt]
    try:
        sections = reader(name, data, max_bytes)
    except BadDocument:
        raise
    except Exception as exc:  # hostile bytes can make any library fail in ways it does not document
        raise BadDocument(name, _UNREADABLE[fmt]) from exc
    if not sections:
        raise BadDocument(name, "no text found (a scanned PDF?)" if fmt == "pdf" else "no text found")
    return Document(name=name, format=fmt, content_hash=hashlib.sha256(data).hexdigest(), sections=sections)


def read_path(path: Path, *, max_bytes: int) -> Document:
    """Read a document from a file, refusing a too-large one from its size alone, before reading a byte."""
    path = Path(path)
    name = path.name
    _format_of(name)  # an unsupported type is refused without touching the file
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or /dev/zero would never end
            raise BadDocument(name, "not a regular file")
        _check_size(name, info.st_size, max_bytes)
        with path.open("rb") as file:
            # One byte more than allowed: the file may have grown since stat(); read_document then refuses it.
            data = file.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise BadDocument(name, "no such file") from exc
    except OSError as exc:
        raise BadDocument(name, f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    return read_document(name, data, max_bytes=max_bytes)


# -- names, sizes, magic numbers -------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    # File names come from users: no newline, escape sequence or line separator may reach a log line or a terminal.
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", text).strip()


def _base_name(name: str) -> str:
    # Browsers on Windows may send "C:\\Users\\...\\fees.pdf".
    return name.replace("\\", "/").rsplit("/", 1)[-1] or name


def _format_of(name: str) -> str:
    stem, dot, extension = name.rpartition(".")
    extension = extension.lower() if dot and stem.strip(".") else ""
    extension = ALIASES.get(extension, extension)
    if extension in FORMATS:
        return extension
    supported = ", ".join(FORMATS)
    if not extension:
        raise BadDocument(name, f"unsupported file type (no extension; supported: {supported})")
    raise BadDocument(name, f"unsupported file type '.{_one_line(extension)[:20]}' (supported: {supported})")


def _check_size(name: str, size: int, max_bytes: int, *, what: str = "too large") -> None:
    if size > max_bytes:
        over, limit = _megabytes(size, max_bytes)
        raise BadDocument(name, f"{what} ({over} MB; the limit is {limit} MB)")


def _megabytes(size: int, limit: int) -> tuple[str, str]:
    """Both in MB with as few decimals as show the limit (more for a tiny one); the size is rounded up and the limit
    down, so a file just over never reads "too large (20 MB; the limit is 20 MB)"."""
    digits = next((d for d in range(1, 7) if math.floor(limit / _MB * 10**d)), 6)

    def show(count: int, rounding: Callable[[float], int]) -> str:
        return f"{rounding(count / _MB * 10**digits) / 10**digits:.{digits}f}".rstrip("0").rstrip(".")

    return show(size, math.ceil), show(limit, math.floor)


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"(\xb5/\xfd", "a zstd archive"),
    (b"\x7fELF", "an ELF executable"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Word, Excel or PowerPoint file"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_RIFF = {b"WAVE": "a WAV sound", b"WEBP": "a WebP image", b"AVI ": "an AVI video"}


def _kind_of(data: bytes) -> str | None:
    """What well-known binary format the bytes are, from their first bytes; None for anything else."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data.startswith(b"RIFF") and data[8:12] in _RIFF:
        return _RIFF[data[8:12]]
    if data[4:8] == b"ftyp":
        return "an MP4, MOV or HEIC file"
    return None


def _check_magic(name: str, fmt: str, data: bytes) -> None:
    kind = _kind_of(data)
    if fmt == "pdf":
        if b"%PDF-" not in data[: _PDF_JUNK + 5]:
            raise BadDocument(name, f"not a PDF (the bytes are {kind})" if kind else "not a PDF")
    elif fmt == "docx":
        if not data.startswith(b"PK\x03\x04"):
            detail = f"; the bytes are {kind}" if kind else ""
            raise BadDocument(name, f"not a Word document (.docx{detail})")
    elif kind is not None:
        what = "an HTML file" if fmt == "html" else "a text file"
        raise BadDocument(name, f"not {what} (the bytes are {kind})")


# -- decoding and whitespace -----------------------------------------------------------------------------------------

# UTF-32 LE first: its BOM starts with UTF-16 LE's.
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# C0 controls no text file has (tab, line breaks, form feed and ESC, for coloured logs, are allowed).
_CONTROL_BYTES = [b for b in range(32) if b not in (9, 10, 11, 12, 13, 27)] + [127]
_HIGH_RUNS = re.compile(rb"[\x80-\xff]{2,}")
_DECLARED_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE)


def _decode(name: str, data: bytes, *, declared: str | None = None) -> str:
    """Bytes to text: a BOM, else UTF-8, else (a charset the page declares, then) cp1252 when it is plausible.

    charset-normalizer is the last resort only: it reads a short Latin-1 file as cp1257 (measured here).
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(codec, errors="replace")
    codec = _utf16_without_bom(data)
    if codec is not None:
        return data.decode(codec, errors="replace")
    if _looks_binary(data):
        raise BadDocument(name, "not a text file (binary content)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    errors = text.count("\ufffd")
    # A UTF-8 file with a stray byte or two (a truncated last character, one pasted cp1252 quote) stays UTF-8:
    # read as cp1252 every other accented letter in it would turn to mojibake.
    non_ascii = len(text) - len(text.encode("ascii", errors="ignore"))
    if non_ascii - errors > 4 * errors:
        return text
    codec = _declared_codec(declared)
    if codec is not None:
        return data.decode(codec, errors="replace")
    try:
        western: str | None = data.decode("cp1252")
    except UnicodeDecodeError:  # cp1252 leaves five bytes undefined
        western = None
    if western is not None and _plausibly_western(data):
        return western
    guessed = _charset_normalizer_guess(data)
    if guessed is not None:
        return guessed
    return western if western is not None else data.decode("latin-1")


def _declared_codec(declared: str | None) -> str | None:
    """The codec for a page's <meta charset>, read as browsers do (the WHATWG encoding rules)."""
    if not declared:
        return None
    try:
        codec = codecs.lookup(declared).name
    except LookupError:
        return None
    if codec in ("latin-1", "iso8859-1", "ascii"):
        return "cp1252"  # every browser reads these labels as windows-1252: “quotes” and € are there
    if codec.startswith(("utf-16", "utf-32")):
        return None  # a page that got this far has no BOM, so it is not UTF-16 whatever it says
    return codec


def _utf16_without_bom(data: bytes) -> str | None:
    """Windows' "Unicode" text without a BOM: mostly-ASCII UTF-16 has a NUL in every other byte."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    even_nuls, odd_nuls = even.count(0) / len(even), odd.count(0) / len(odd)
    if odd_nuls > 0.7 and even_nuls < 0.05:
        return "utf-16-le"
    if even_nuls > 0.7 and odd_nuls < 0.05:
        return "utf-16-be"
    return None


def _looks_binary(data: bytes) -> bool:
    # Random bytes have ~10% of these; real text far under 5%, and a few stray ones do not make a file binary.
    sample = data[:32768] + data[-32768:] if len(data) > 65536 else data
    controls = sum(sample.count(byte) for byte in _CONTROL_BYTES)
    return controls > 0.05 * len(sample) and controls >= 8


def _plausibly_western(data: bytes) -> bool:
    """cp1252 text has its accented letters alone between ASCII ones; Cyrillic cp1251, GBK or Shift-JIS bytes come in
    runs. Few high bytes at all (a short file) are taken as cp1252: no guesser is reliable on so little."""
    sample = data[:65536]
    high = sum(1 for byte in sample if byte >= 0x80)
    if high < 16:
        return True
    in_runs = sum(len(run) - 1 for run in _HIGH_RUNS.findall(sample))
    return in_runs < 0.3 * high


def _charset_normalizer_guess(data: bytes) -> str | None:
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        return None
    try:
        return data.decode(best.encoding, errors="replace")
    except LookupError:
        return None


_LINE_BREAKS = (("\r\n", "\n"), ("\r", "\n"), ("\v", "\n"), ("\f", "\n\n"), ("\u2028", "\n"), ("\u2029", "\n\n"))
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufeff\u200b]+")
# Only what changes: matching every single space of a 20 MB text took seconds.
_SPACES = re.compile(
    r"[ \t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]{2,}|[\t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]"
)
_LINE_EDGES = re.compile(r" \n ?|\n ")
_BLANK_LINES = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    """Collapse runs of spaces and tabs, keep paragraph breaks (one blank line), drop control characters."""
    for old, new in _LINE_BREAKS:  # str.replace, not str.translate: translate looks up every character in Python
        text = text.replace(old, new)
    text = _CONTROLS.sub("", text)
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text))
    text = _LINE_EDGES.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def _squash(text: str) -> str:
    """One line: every run of whitespace becomes one space (headings, table cells, CSV values)."""
    return _clean(re.sub(r"\s+", " ", text))


class _Outline:
    """Sections under a heading path: text arrives in blocks, headings close the section before them."""

    def __init__(self, *, page: int | None = None) -> None:
        self.sections: list[Section] = []
        self._page = page
        self._path: list[tuple[int, str]] = []
        self._blocks: list[str] = []

    def add(self, text: str) -> None:
        self._blocks.append(text)

    def heading(self, level: int, title: str) -> None:
        self.flush()
        title = _squash(title)
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        if title:
            self._path.append((level, title))

    def flush(self) -> None:
        text = _clean("\n\n".join(self._blocks))
        self._blocks = []
        if text:
            heading = " > ".join(title for _, title in self._path) or None
            self.sections.append(Section(text=text, page=self._page, heading=heading))


# -- txt, md, csv ----------------------------------------------------------------------------------------------------


def _read_txt(name: str, data: bytes, max_bytes: int) -> list[Section]:
    text = _clean(_decode(name, data))
    if not text:
        raise BadDocument(name, "empty file")
    return [Section(text=text)]


# Only the opening: a regex for the optional closing #s backtracks quadratically on a long run of spaces.
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t](.*))?$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def _read_md(name: str, data: bytes, max_bytes: int) -> list[Section]:
    text = _decode(name, data).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise BadDocument(name, "empty file")
    outline = _Outline()
    lines: list[str] = []
    fence: str | None = None  # the opening fence while inside a code block: its "# comments" are not headings
    for line in text.split("\n"):
        opening = _FENCE.match(line)
        if fence is None and opening and not (opening.group(1)[0] == "`" and "`" in opening.group(2)):
            fence = opening.group(1)
        elif fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = fence if opening.group(2).strip() else None  # a closing fence has no info string
        else:
            heading = _ATX_HEADING.match(line)
            if heading:
                outline.add("\n".join(lines))
                lines = []
                outline.heading(len(heading.group(1)), _atx_title(heading.group(2) or ""))
                continue
        lines.append(line)
    outline.add("\n".join(lines))
    outline.flush()
    return outline.sections


def _atx_title(text: str) -> str:
    """A heading's text without its optional closing sequence ("## Fees ##")."""
    text = text.strip()
    bare = text.rstrip("#")
    if not bare or (bare != text and bare[-1] in " \t"):
        return bare.strip()
    return text


def _read_csv(name: str, data: bytes, max_bytes: int) -> list[Section]:
    text = _decode(name, data).replace("\x00", "")
    if not text.strip():
        raise BadDocument(name, "empty file")
    # csv refuses fields over 131,072 characters by default; a field can be as long as the file may be. The limit is
    # process-wide, so it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), min(max_bytes, 2**31 - 1)))
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=_sniff_delimiter(text))
    try:
        return _csv_sections(name, rows)
    except csv.Error as exc:
        raise BadDocument(name, f"malformed CSV (line {rows.line_num})") from exc


def _sniff_delimiter(text: str) -> str:
    sample = text[:_SNIFF_CHARS]
    if len(text) > _SNIFF_CHARS and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # whole lines only: a cut line reads as a different column count
    try:
        # Only the delimiter is taken: the Sniffer's quote guess turns apostrophes into quote characters.
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        # The Sniffer wants the same column count on every line; the header's most frequent candidate will do.
        header = sample.split("\n", 1)[0]
        counts = {delimiter: header.count(delimiter) for delimiter in _DELIMITERS}
        best = max(counts, key=counts.__getitem__)
        return best if counts[best] else ","


def _csv_sections(name: str, rows: Iterator[list[str]]) -> list[Section]:
    header: list[str] | None = None
    sections: list[Section] = []
    lines: list[str] = []
    for row in rows:
        values = [_squash(value) for value in row]
        if not any(values):
            continue
        if header is None:
            header = [value or f"column {i}" for i, value in enumerate(values, 1)]
            continue
        names = header + [f"column {i}" for i in range(len(header) + 1, len(values) + 1)]
        lines.append("; ".join(f"{key}: {value}" for key, value in zip(names, values, strict=False) if value))
        if len(lines) == _ROWS_PER_SECTION:
            sections.append(Section(text="\n".join(lines)))
            lines = []
    if lines:
        sections.append(Section(text="\n".join(lines)))
    if header is not None and not sections:
        raise BadDocument(name, "no rows below the header")
    return sections


# -- html ------------------------------------------------------------------------------------------------------------

_HEADINGS = {f"h{level}": level for level in range(1, 7)}
# Never text: code, styling, navigation and other page furniture, embedded documents, form controls.
_DROPPED = (
    "script",
    "style",
    "noscript",
    "template",
    "iframe",
    "frame",
    "frameset",
    "object",
    "embed",
    "applet",
    "svg",
    "math",
    "canvas",
    "nav",
    "aside",
    "button",
    "select",
    "input",
    "head",
)
# How each element shapes the text: "para" ends a paragraph (blank line), "line" a line, "pre" is a paragraph whose
# whitespace counts, "cell" joins a table row's cells with " | "; anything else is inline.
_HTML_ROLES = {
    **dict.fromkeys(_HEADINGS, "heading"),
    **dict.fromkeys(
        (
            *("p", "div", "section", "article", "main", "header", "footer", "blockquote", "table", "ul", "ol", "dl"),
            *("figure", "form", "fieldset", "details", "address", "body", "hr"),
        ),
        "para",
    ),
    **dict.fromkeys(
        ("li", "tr", "dt", "dd", "br", "caption", "figcaption", "summary", "thead", "tbody", "tfoot"), "line"
    ),
    **dict.fromkeys(("pre", "textarea"), "pre"),
    **dict.fromkeys(("td", "th"), "cell"),
}
# trafilatura's XML: <head rend="h2">, <p>, <list><item>, <table><row><cell>, <quote>, <code>, <lb/>.
_EXTRACT_ROLES = {
    "head": "heading",
    **dict.fromkeys(("p", "list", "table", "quote", "div", "main"), "para"),
    **dict.fromkeys(("item", "row", "lb"), "line"),
    "code": "pre",
    "cell": "cell",
}
_SOURCE_SPACE = re.compile(r"\s+")
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]+")
_MAIN_TEXT_MIN = 250  # trafilatura's own MIN_EXTRACTED_SIZE: below it, it falls back to a flat dump of the page


def _read_html(name: str, data: bytes, max_bytes: int) -> list[Section]:
    import lxml.html

    match = _DECLARED_CHARSET.search(data[:4096])
    text = _decode(name, data, declared=match.group(1).decode("ascii") if match else None)
    if not text.strip():
        raise BadDocument(name, "empty file")
    # lxml refuses a str that carries an XML encoding declaration (XHTML); UTF-8 bytes with the encoding named work.
    # Characters XML forbids would make lxml raise later, when dropping an element joins the text around it.
    parser = lxml.html.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)
    tree = lxml.html.document_fromstring(_NOT_XML.sub("", text).encode("utf-8"), parser=parser)
    _drop_furniture(tree)
    sections = _html_main_text(tree)
    if sum(len(section.text) for section in sections) < _MAIN_TEXT_MIN:
        # On a short page trafilatura returns None, or its baseline: all the text flattened into one paragraph,
        # headings and rows lost. The page minus its furniture (dropped above) is as good and keeps its structure.
        body = tree.find("body")
        sections = _walk(body if body is not None else tree, _html_role)
    return sections


def _drop_furniture(tree: Any) -> None:
    """Remove what must never reach a Section, whatever trafilatura decides about the rest."""
    for element in tree.xpath(" | ".join(f"//{tag}" for tag in _DROPPED)):
        element.drop_tree()
    # A page's header and footer are boilerplate; an article's own <header> holds its title, so it stays.
    for element in tree.xpath(
        "//header[not(ancestor::article or ancestor::main)] | //footer[not(ancestor::article or ancestor::main)]"
        " | //*[@role='navigation' or @role='banner' or @role='contentinfo' or @hidden or @aria-hidden='true']"
    ):
        if element.getparent() is not None:  # not inside one dropped already
            element.drop_tree()


def _html_main_text(tree: Any) -> list[Section]:
    import copy

    from lxml import etree

    trafilatura = _trafilatura()
    if trafilatura is None:
        return []
    extracted = trafilatura.extract(
        copy.deepcopy(tree),  # trafilatura prunes the tree it is given; the fallback needs it whole
        output_format="xml",
        include_links=False,
        include_images=False,
        include_comments=False,
        include_tables=True,
        with_metadata=False,
    )
    if not extracted:
        return []
    root = etree.fromstring(extracted.encode("utf-8"), parser=etree.XMLParser(resolve_entities=False, no_network=True))
    main = root.find("main")
    return _walk(main if main is not None else root, _extract_role)


@functools.cache
def _trafilatura() -> Any:
    try:
        import trafilatura
    except ImportError:  # e.g. lxml 6 without lxml-html-clean, which trafilatura's justext needs
        _log.warning("trafilatura cannot be imported: HTML pages are read without its main-text detection")
        return None
    return trafilatura


def _html_role(element: Any) -> tuple[str, int]:
    tag = element.tag if isinstance(element.tag, str) else ""
    return _HTML_ROLES.get(tag, "inline"), _HEADINGS.get(tag, 0)


def _extract_role(element: Any) -> tuple[str, int]:
    tag = element.tag if isinstance(element.tag, str) else ""
    return _EXTRACT_ROLES.get(tag, "inline"), _HEADINGS.get(element.get("rend", ""), 2)


def _walk(root: Any, role_of: Callable[[Any], tuple[str, int]]) -> list[Section]:
    """Sections from an element tree in document order: headings start sections, blocks become paragraphs and
    lines, table rows "a | b". Iterative (lxml's iterwalk): a deeply nested page cannot exhaust Python's stack."""
    from lxml import etree

    outline = _Outline()
    parts: list[str] = []  # the text since the last heading
    heading: list[str] | None = None  # while inside a heading: its text
    heading_element, heading_level = None, 0
    cells = 0  # inside a table cell (nesting depth): blocks there are spaces, so a row stays one line
    first_cell = True
    pre = 0  # inside <pre>: source whitespace is text

    def add(text: str | None, *, structure: bool = False) -> None:
        # The source's own line breaks are spaces in HTML (outside <pre>); only the elements make lines.
        if text:
            (heading if heading is not None else parts).append(
                text if pre or structure else _SOURCE_SPACE.sub(" ", text)
            )

    for event, element in etree.iterwalk(root, events=("start", "end")):
        role, level = role_of(element)
        if event == "start":
            if role == "heading" and heading is None:
                outline.add("".join(parts))
                parts, heading, heading_element, heading_level = [], [], element, level
            elif role == "cell":
                add(" " if first_cell else " | ", structure=True)
                first_cell = False
                cells += 1
            elif role in ("para", "line", "pre"):
                add(" " if cells else "\n\n" if role != "line" else "\n", structure=True)
                first_cell = first_cell or not cells
                pre += role == "pre"
            add(element.text)
        else:
            if element is heading_element:
                outline.heading(heading_level, "".join(heading or []))
                heading, heading_element = None, None
            elif role == "cell":
                cells -= 1
            elif role in ("para", "pre"):  # a line ends where the next one starts: </li><li> is one break
                pre -= role == "pre"
                add(" " if cells else "\n\n", structure=True)
                first_cell = not cells
            if element is not root:
                add(element.tail)
    outline.add("".join(parts))
    outline.flush()
    return outline.sections


# -- pdf, docx -------------------------------------------------------------------------------------------------------


def _read_pdf(name: str, data: bytes, max_bytes: int) -> list[Section]:
    from pypdf import PdfReader

    # pypdf (not strict) rebuilds a cut-off file from what it finds and reads its first pages as if whole.
    if b"%%EOF" not in data[-2048:]:
        raise BadDocument(name, "corrupt or truncated PDF")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                # An owner password alone ("no copying") leaves the user password empty: such files open anywhere.
                opened = reader.decrypt("")
            except Exception:  # an algorithm pypdf cannot do without an optional dependency
                opened = 0
            if not opened:
                raise BadDocument(name, "encrypted PDF")
        if len(reader.pages) == 0:
            raise BadDocument(name, "corrupt or truncated PDF")
        sections = []
        for number, page in enumerate(reader.pages, 1):
            text = _clean(page.extract_text() or "")
            if text:
                sections.append(Section(text=text, page=number))
    except BadDocument:
        raise
    except Exception as exc:  # EmptyFileError, PdfStreamError, PdfReadError, ValueError, KeyError...
        raise BadDocument(name, "corrupt or truncated PDF") from exc
    return sections


_DOCX_HEADING = re.compile(r"^heading\s*(\d)$", re.IGNORECASE)


def _read_docx(name: str, data: bytes, max_bytes: int) -> list[Section]:
    import docx

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except Exception as exc:  # BadZipFile, or a broken central directory that zipfile trips over otherwise
        raise BadDocument(name, "not a Word document (.docx)") from exc
    # Before python-docx reads every part into memory: a zip bomb. zipfile stops reading a member at its stated size.
    _check_size(name, unpacked, _DOCX_UNPACK_FACTOR * max_bytes, what="too large once unpacked")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # PackageNotFoundError, KeyError, XMLSyntaxError, ValueError (an .xlsx)...
        raise BadDocument(name, "not a Word document (.docx)") from exc
    return _docx_sections(document.iter_inner_content())


def _docx_sections(blocks: Iterable[Any]) -> list[Section]:
    from docx.table import Table

    outline = _Outline()
    for block in blocks:  # paragraphs and tables in body order
        if isinstance(block, Table):
            outline.add("\n".join(_table_lines(block)))
            continue
        level = _docx_heading_level(block)
        if level is not None and block.text.strip():
            outline.heading(level, block.text)
        else:
            outline.add(block.text)
    outline.flush()
    return outline.sections


def _docx_heading_level(paragraph: Any) -> int | None:
    style = paragraph.style
    if style is None:
        return None
    for label in (style.name or "", style.style_id or ""):
        if label.lower() == "title":
            return 0
        match = _DOCX_HEADING.match(label)
        if match:
            return int(match.group(1))
    return None


def _table_lines(table: Any) -> Iterator[str]:
    for row in table.rows:
        cells = []
        previous = None
        for cell in row.cells:
            if cell._tc is previous:  # a merged cell is listed once per grid column it spans
                continue
            previous = cell._tc
            cells.append(_squash(cell.text))
        if any(cells):
            yield " | ".join(cells)


_READERS: dict[str, Callable[[str, bytes, int], list[Section]]] = {
    "txt": _read_txt,
    "md": _read_md,
    "html": _read_html,
    "pdf": _read_pdf,
    "docx": _read_docx,
    "csv": _read_csv,
}
_UNREADABLE = {
    "txt": "unreadable text file",
    "md": "unreadable Markdown file",
    "html": "unreadable HTML file",
    "pdf": "corrupt or truncated PDF",
    "docx": "unreadable Word document (.docx)",
    "csv": "unreadable CSV file",
}
