"""CSV cells a spreadsheet will not run: the one rule every CSV export of the workbench goes through.

Excel, LibreOffice and Google Sheets read a cell starting with `=`, `+`, `-` or `@` as a formula (and a
leading tab or carriage return can hide such a start), so text from callers, models or user SQL could run
as one when someone opens an export. OWASP's advice is to prefix such a cell with a single quote, which
spreadsheets show as text. Only text is touched: a number such as -3 stays a number.
"""

from __future__ import annotations

__all__ = ["FORMULA_PREFIXES", "QUOTE", "safe_csv_cell"]

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def safe_csv_cell(value: object) -> object:
    """`value` as a CSV cell should carry it: text a spreadsheet would run as a formula gets a leading quote."""
    if isinstance(value, str) and value[:1] in FORMULA_PREFIXES:
        return QUOTE + value
    return value
