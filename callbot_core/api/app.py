"""The FastAPI application: settings, store and conversation service built once, routes included, errors in one
shape (`errors.py`), every request given an id and a body limit (`middleware.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import callbot_core
from callbot_core.api import errors, events, limits, metrics
from callbot_core.api.context import ApiContext
from callbot_core.api.middleware import RequestLimits
from callbot_core.api.routes import auth, conversations, health, knowledge, openai_compat, personas, runs, sql
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store, open_store

DESCRIPTION = """The Callbot Workbench engine over HTTP: conversations and turns (JSON or server-sent events),
personas as OpenAI-compatible models, live events over WebSocket, SQL over the store, Prometheus metrics.

Every route but `/health` needs `Authorization: Bearer <token>` (from `POST /v1/auth/token`) or an API key
(`Authorization: Bearer cbk_…` or `X-API-Key`). Errors are `{"error": {"code", "message"}}`."""


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    service: ConversationService | None = None,
    plugins: list[Callable[[FastAPI, ApiContext], None]] | None = None,
) -> FastAPI:
    """The API over `settings`' store (or the given store and service, as tests do)."""
    settings = settings or get_settings()
    store = store or (service.store if service is not None else open_store(settings))
    service = service or ConversationService(store, settings)
    ctx = ApiContext(settings=settings, store=store, service=service, secret=settings.secret())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for close in reversed(ctx.parts.get("on_close", [])):
            close()

    app = FastAPI(
        title="Callbot Workbench API",
        version=callbot_core.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    errors.install(app)
    for module in (health, auth, conversations, personas, knowledge, runs, sql, openai_compat):
        app.include_router(module.router)
    # Parts that add observers, middleware or routes of their own (live events, rate limits, metrics). Metrics last:
    # its middleware then wraps the others', so a request they answer (a 429) is timed and logged too.
    for setup in (events.setup, limits.setup, *(plugins or []), metrics.setup):
        setup(app, ctx)
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.api_max_body_bytes,
        max_upload_bytes=settings.api_max_upload_bytes,
        upload_paths=knowledge.UPLOAD_PATHS,
    )
    return app
