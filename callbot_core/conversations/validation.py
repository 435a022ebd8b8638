"""Sanitising and validating what users type, before anything touches the store."""

from __future__ import annotations

import re
import unicodedata

from callbot_core.errors import InvalidInput

# C0/C1 control characters other than tab and newline: invisible, and some break terminals and CSV.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Lone surrogates: what a non-UTF-8 byte in argv becomes in Python (surrogateescape), or a JSON "\ud800" escape.
# They are no text: they cannot be encoded for the store, the model or a terminal, so they are refused up front.
_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_UTF8 = "is not valid text: it holds bytes that are not UTF-8 (check the terminal's encoding)"


def require_text(value: str, what: str) -> str:
    """`value` unchanged, or `InvalidInput` saying that `what` holds bytes that are not UTF-8."""
    if _SURROGATE.search(value):
        raise InvalidInput(f"{what} {NOT_UTF8}")
    return value


def _normalise(text: str) -> str:
    """One newline convention, NFC, no control characters, no surrounding blanks."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text).strip()


def clean_message(text: object, *, max_chars: int) -> str:
    """The user's message, normalised; raises `InvalidInput` naming what was wrong."""
    if not isinstance(text, str):
        raise InvalidInput(f"A message must be text, not {type(text).__name__}")
    require_text(text, "The message")
    text = _normalise(text)
    if not text:
        raise InvalidInput("The message is empty: type something to say to the bot")
    if len(text) > max_chars:
        raise InvalidInput(
            f"The message is too long: {len(text):,} characters, the limit is {max_chars:,} (CALLBOT_MAX_MESSAGE_CHARS)"
        )
    return text


VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_VARIABLES = 30
MAX_VARIABLE_CHARS = 500


def clean_variables(variables: object) -> dict[str, str]:
    """Prompt variables (`{{caller_name}}` …) as given to a conversation; raises `InvalidInput` naming the bad one."""
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        raise InvalidInput(f"Prompt variables must be a mapping of names to text, not {type(variables).__name__}")
    if len(variables) > MAX_VARIABLES:
        raise InvalidInput(f"Too many prompt variables: {len(variables)}, the limit is {MAX_VARIABLES}")
    out: dict[str, str] = {}
    for name, value in variables.items():
        if not isinstance(name, str) or not VARIABLE_NAME.fullmatch(name):
            raise InvalidInput(f"Prompt variable name {name!r} is not valid: use letters, digits and _ (caller_name)")
        if not isinstance(value, str):
            raise InvalidInput(f"Prompt variable {name!r} must be text, not {type(value).__name__}")
        require_text(value, f"Prompt variable {name!r}")
        value = _normalise(value)
        if len(value) > MAX_VARIABLE_CHARS:
            raise InvalidInput(
                f"Prompt variable {name!r} is too long: {len(value):,} characters, the limit is {MAX_VARIABLE_CHARS}"
            )
        out[name] = value
    return out
