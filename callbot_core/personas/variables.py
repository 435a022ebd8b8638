"""Prompt variables: `{{name}}` placeholders in a system prompt, their defaults, and rendering."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

VARIABLE_PATTERN = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
KNOWN_VARIABLES = ("caller_name", "today", "persona_name")


def prompt_variables(text: str) -> list[str]:
    """The `{{variable}}` names in a prompt, in order of first appearance."""
    seen: dict[str, None] = {}
    for match in VARIABLE_PATTERN.finditer(text):
        seen.setdefault(match.group(1), None)
    return list(seen)


def default_variables(persona_name: str) -> dict[str, str]:
    return {"caller_name": "the caller", "today": datetime.now(UTC).date().isoformat(), "persona_name": persona_name}


def render_system_prompt(text: str, variables: dict[str, Any]) -> str:
    """Replace `{{name}}` by its value; unknown variables stay as written so a typo is visible, not blanked."""

    def _sub(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(variables[name]) if name in variables else match.group(0)

    return VARIABLE_PATTERN.sub(_sub, text)
