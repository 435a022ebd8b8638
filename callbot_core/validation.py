"""Sanitising and validating what users type, before anything touches the store."""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidInput

# C0/C1 control characters other than tab and newline: invisible, and some break terminals and CSV.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_message(text: object, *, max_chars: int) -> str:
    """The user's message, normalised; raises `InvalidInput` naming what was wrong."""
    if not isinstance(text, str):
        raise InvalidInput(f"A message must be text, not {type(text).__name__}")
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text).strip()
    if not text:
        raise InvalidInput("The message is empty: type something to say to the bot")
    if len(text) > max_chars:
        raise InvalidInput(
            f"The message is too long: {len(text):,} characters, the limit is {max_chars:,} (CALLBOT_MAX_MESSAGE_CHARS)"
        )
    return text
