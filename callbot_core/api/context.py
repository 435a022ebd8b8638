"""What every route works with, built once per application: settings, the store, the conversation service."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings
from callbot_core.store import Store


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    service: ConversationService
    secret: str
    # Parts added by other modules at start (events, metrics, limits, cache): looked up by name, so the
    # context does not import them all.
    parts: dict[str, Any] = field(default_factory=dict)


def api_context(request: Request) -> ApiContext:
    return request.app.state.ctx
