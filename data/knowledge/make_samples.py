"""Write the binary and non-UTF-8 sample documents of the clinic knowledge base, deterministically.

    .venv/bin/python data/knowledge/make_samples.py

rewrites clinic/fees.pdf (3 pages, hand-written PDF), clinic/insurance.docx (python-docx) and clinic/faq.txt
(encoded in cp1252). The other files in clinic/ are plain text and edited by hand. All facts are invented.
"""

from __future__ import annotations

import io
import textwrap
import zipfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent / "clinic"
CLINIC = "Riverside Medical Clinic"

# --- fees.pdf: one list of (kind, text) blocks per page; kind is "h1", "h2", "p" or "item" ----------------------

FEES_PAGES: list[list[tuple[str, str]]] = [
    [
        ("h1", "Consultation fees"),
        (
            "p",
            f"{CLINIC} - price list for self-paying patients and for services that health insurance does not "
            "cover. All prices are in euros (EUR) and include VAT where it applies.",
        ),
        ("h2", "Consultations"),
        ("item", "Standard consultation (up to 15 minutes): 45 EUR"),
        ("item", "Long consultation (up to 30 minutes): 80 EUR"),
        ("item", "First visit for new patients, including full medical history: 95 EUR"),
        ("item", "Telephone or video consultation: 30 EUR"),
        ("item", "Home visit within Neustadt: 120 EUR (outside Neustadt add 1 EUR per kilometre)"),
        ("h2", "Tests in the clinic"),
        ("item", "Blood sample taken and sent to the laboratory: 15 EUR (the laboratory bills its fees separately)"),
        ("item", "Resting ECG with written report: 40 EUR"),
        ("item", "Urine dipstick test: 10 EUR"),
    ],
    [
        ("h1", "Vaccinations and certificates"),
        ("h2", "Vaccinations"),
        ("p", "Vaccination prices include the vaccine itself and the injection. Bring your vaccination record."),
        ("item", "Flu vaccination (seasonal influenza): 25 EUR"),
        ("item", "Tetanus and diphtheria booster: 35 EUR"),
        ("item", "Hepatitis A, per dose: 60 EUR"),
        ("item", "Typhoid vaccination: 45 EUR"),
        ("item", "Yellow fever: not available at the clinic; we refer you to the regional travel vaccination centre."),
        ("h2", "Certificates and documents"),
        ("item", "Certificate of fitness for sport or work: 40 EUR"),
        ("item", "Medical report for a driving licence application: 50 EUR"),
        ("item", "Certificate for a travel cancellation insurance claim: 20 EUR"),
        ("item", "Copy of your medical records: 0.50 EUR per page"),
    ],
    [
        ("h1", "Cancellation policy and payment"),
        ("h2", "Cancelling or moving an appointment"),
        (
            "p",
            "Please cancel or move an appointment at least 24 hours in advance, by phone or with the online "
            "booking link in your confirmation e-mail. Cancelling 24 hours or more before the appointment is free. "
            "If you cancel less than 24 hours before the appointment, we charge a late cancellation fee of 20 EUR.",
        ),
        ("h2", "Missed appointments (no-show)"),
        (
            "p",
            "If you do not come to your appointment and have not cancelled it, we charge a no-show fee of 35 EUR. "
            "We waive the fee for emergencies and sudden illness. After three missed appointments within twelve "
            "months, you can only book same-day appointments.",
        ),
        ("h2", "Payment methods"),
        (
            "p",
            "You can pay at reception in cash, by debit card (girocard or Maestro) or by credit card (Visa and "
            "Mastercard). We do not accept American Express or cheques. Invoices can also be paid by bank "
            "transfer within 14 days; the bank details are printed on the invoice.",
        ),
    ],
]

_STYLE = {"h1": (18, 28), "h2": (13, 26), "p": (11, 20), "item": (11, 15)}  # font size, space above the block
_LEADING = 15  # between the wrapped lines of one block


def _pdf_text(text: str) -> str:
    text.encode("ascii")  # keep the PDF text plain ASCII: no font encoding surprises for text extraction
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def _page_stream(blocks: list[tuple[str, str]], number: int, total: int) -> bytes:
    ops = ["BT", "72 750 Td"]
    for index, (kind, text) in enumerate(blocks):
        size, space = _STYLE[kind]
        indent = "" if kind == "p" else "  "
        lines = textwrap.wrap(text, 84 if kind == "p" else 80, subsequent_indent=indent, break_on_hyphens=False)
        if kind == "item":
            lines[0] = "- " + lines[0]
        ops.append(f"/F1 {size} Tf")
        for i, line in enumerate(lines):
            if index or i:
                ops.append(f"0 -{_LEADING if i else space} Td")
            ops.append(f"{_pdf_text(line)} Tj")
    footer = _pdf_text(f"{CLINIC} - fees and policies - page {number} of {total}")
    ops += ["ET", "BT", "/F1 9 Tf", "72 40 Td", f"{footer} Tj", "ET"]
    return ("\n".join(ops) + "\n").encode("ascii")


def make_pdf(pages: list[list[tuple[str, str]]]) -> bytes:
    """A minimal valid PDF: catalog, page tree, one Helvetica font, one content stream per page."""
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for i, blocks in enumerate(pages):
        page, content = page_ids[i], page_ids[i] + 1
        objects[page] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content} 0 R >>"
        ).encode()
        stream = _page_stream(blocks, i + 1, n)
        objects[content] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream"
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


# --- insurance.docx -------------------------------------------------------------------------------------------

INSURERS = [
    ("Neustadt Public Health Fund", "Yes", "Statutory fund. Show your insurance card at the first visit each quarter."),
    ("Rhineland Workers' Health Fund", "Yes", "Statutory fund. Billed directly; nothing to pay at reception."),
    ("Allcare Private Health", "Yes", "Direct billing: the clinic sends the invoice straight to Allcare."),
    ("Bluebridge Insurance", "Yes", "You pay the invoice yourself and claim the money back from Bluebridge."),
    ("Nordlicht Mutual", "No", "Contract ended; you pay the full bill yourself and get no refund from Nordlicht."),
    ("Global Expat Cover", "Yes", "Direct billing with a guarantee of payment; show your membership card."),
    ("Sunway Travel Insurance", "No", "Pay at the clinic and claim the cost back from Sunway afterwards."),
    ("European Health Insurance Card (EHIC)", "Yes", "For visitors from other EU countries; bring the card and ID."),
]


def make_docx() -> bytes:
    from docx import Document

    doc = Document()
    props = doc.core_properties
    fixed = datetime(2025, 1, 1)
    props.author = props.last_modified_by = "Callbot Workbench"
    props.title = f"{CLINIC} - health insurance"
    props.created = props.modified = props.last_printed = fixed
    props.revision = 1

    doc.add_heading("Health insurance", level=1)
    doc.add_paragraph(
        f"{CLINIC} treats patients with statutory health insurance, private health insurance and travel "
        "insurance. This page explains what to bring to your appointment and how billing works."
    )
    doc.add_heading("Statutory health insurance", level=2)
    doc.add_paragraph(
        "If you have statutory (public) health insurance, bring your electronic health insurance card to your "
        "first visit in every quarter. Covered treatment is billed directly to your health fund, so you pay "
        "nothing at reception. If you forget the card, we issue a private invoice, which we cancel when you "
        "show the card before the end of the quarter."
    )
    doc.add_heading("Private health insurance", level=2)
    doc.add_paragraph(
        "Privately insured patients receive an itemised invoice by post after the treatment. You pay the "
        "invoice yourself and then send it to your private insurer to be reimbursed. Some private insurers pay "
        "the clinic directly; the table below shows which ones."
    )
    doc.add_heading("Travel and international insurance", level=2)
    doc.add_paragraph(
        "International visitors without a card from the table below pay at the clinic and claim the cost back "
        "from their travel insurance. Ask reception for an invoice in English."
    )
    doc.add_heading("Insurers we work with", level=2)
    table = doc.add_table(rows=1, cols=3)
    table.style = "Table Grid"
    for cell, text in zip(table.rows[0].cells, ("Insurer", "Accepted", "Notes"), strict=True):
        cell.text = text
    for row in INSURERS:
        for cell, text in zip(table.add_row().cells, row, strict=True):
            cell.text = text

    _slim(doc)
    raw = io.BytesIO()
    doc.save(raw)
    return _fixed_zip_times(raw.getvalue())


def _slim(doc) -> None:
    """Keep the .docx small: drop the template's optional parts, latent styles and the styles nobody uses."""
    from docx.oxml.ns import qn

    for rels in (doc.part.rels, doc.part.package.rels):  # unreferenced parts are not written
        for rid, rel in list(rels.items()):
            if rel.reltype.rsplit("/", 1)[-1] in ("stylesWithEffects", "customXml", "thumbnail"):
                del rels[rid]
    styles = doc.styles.element
    styles.remove(styles.find(qn("w:latentStyles")))
    by_id = {s.get(qn("w:styleId")): s for s in styles.findall(qn("w:style"))}
    used = set(doc.element.body.xpath(".//w:pStyle/@w:val | .//w:rStyle/@w:val | .//w:tblStyle/@w:val"))
    used |= {sid for sid, s in by_id.items() if s.get(qn("w:default")) == "1"}
    todo = list(used)
    while todo:  # add the styles the used ones are based on or linked to
        style = by_id.get(todo.pop())
        for tag in ("w:basedOn", "w:link", "w:next"):
            ref = style.find(qn(tag)) if style is not None else None
            if ref is not None and ref.get(qn("w:val")) not in used:
                used.add(ref.get(qn("w:val")))
                todo.append(ref.get(qn("w:val")))
    for sid, style in by_id.items():
        if sid not in used:
            styles.remove(style)


def _fixed_zip_times(data: bytes) -> bytes:
    """python-docx stamps every zip member with the current time: rewrite them with a fixed one."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=(2025, 1, 1, 0, 0, 0))
            dst.writestr(member, src.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out.getvalue()


# --- faq.txt (cp1252) -----------------------------------------------------------------------------------------

FAQ = f"""{CLINIC} - frequently asked questions

Q: How do I renew a repeat prescription?
A: Order a repeat prescription with the request form at reception, through the online patient portal or by
leaving a message on the prescription answerphone. Renewed prescriptions are ready to collect at reception
after two working days. Your doctor reviews long-term medication once a year; if your review is due, you will
be asked to book an appointment first.

Q: Can I get my test results by phone?
A: Yes. Blood and urine test results usually arrive after three to five working days. Call the results line
on weekdays between 14:00 and 16:00. For data protection we only give results to the patient, after checking
the date of birth. Abnormal results are always discussed with a doctor, and we will call you ourselves.

Q: Can I bring my children to my appointment?
A: Yes, children are welcome. There is a small play corner with books and toys in the waiting room. Please do
not leave children alone there while you are in the consulting room. Children under 16 who have their own
appointment must come with a parent or another adult.

Q: I left something behind at the clinic. Where is the lost property?
A: Reception keeps lost property for four weeks. After that, unclaimed items are handed to the town's lost
property office:
    Fundbüro Neustadt
    Rathausstraße 3
    Neustadt
The Fundbüro is open Monday to Thursday from 09:00 to 15:00.

Q: Who do I talk to about a complaint?
A: Please write to our practice manager, Renée Lambert, by letter or at the reception desk. You will receive
an answer within ten working days.
"""


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    (HERE / "fees.pdf").write_bytes(make_pdf(FEES_PAGES))
    (HERE / "insurance.docx").write_bytes(make_docx())
    (HERE / "faq.txt").write_bytes(FAQ.encode("cp1252"))
    for name in ("fees.pdf", "insurance.docx", "faq.txt"):
        print(f"wrote {HERE / name} ({(HERE / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
