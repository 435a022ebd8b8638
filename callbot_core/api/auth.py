"""Who is asking: every route but `/health` needs a bearer JWT (`POST /v1/auth/token`) or an API key.

A key goes in `Authorization: Bearer cbk_…` (what the OpenAI SDK sends as its api_key) or in `X-API-Key`. The
actor a route gets is the engine's (`UserInfo` for a token, `KeyActor` for a key), so the engine's permission
table decides what it may do; a key's scopes narrow it there, not here. What is refused here is only "who are
you": a missing, forged, expired or revoked credential is a 401 naming which, with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from callbot_core.access import apikeys, tokens
from callbot_core.access.clients import client_address
from callbot_core.access.permissions import Actor
from callbot_core.api.context import ApiContext, api_context
from callbot_core.api.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="A JWT from POST /v1/auth/token, or an API key (cbk_…)")
key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (cbk_…)")

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, CHALLENGE)


def resolve_actor(ctx: ApiContext, credential: str | None) -> Actor:
    """The actor a credential stands for, or a 401. Blocking (one store read): call it off the event loop."""
    if not credential:
        raise unauthorized("Sign in: send Authorization: Bearer <token or API key>, or X-API-Key")
    if apikeys.looks_like_key(credential):
        actor = apikeys.actor_for_key(ctx.store, credential)
        if actor is None:
            raise unauthorized("This API key is not valid: unknown, revoked or expired")
        return actor
    user = tokens.user_for(ctx.store, ctx.secret, credential)
    if user is None:
        raise unauthorized("This token is not valid: expired, signed out or not ours; get a new one")
    return user


def credential_of(creds: HTTPAuthorizationCredentials | None, key: str | None) -> str | None:
    return key or (creds.credentials if creds is not None else None)


async def current_actor(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    key: Annotated[str | None, Security(key_header)],
    ctx: Annotated[ApiContext, Depends(api_context)],
) -> Actor:
    actor = await run_in_threadpool(resolve_actor, ctx, credential_of(creds, key))
    request.state.actor = actor
    request.state.api_key_id = getattr(actor, "key_id", None)
    return actor


def client_addr(request: Request) -> str | None:
    """The client's address, through trusted proxies only (`CALLBOT_TRUSTED_PROXIES`), for audit and limits."""
    ctx: ApiContext = request.app.state.ctx
    peer = request.client.host if request.client else None
    return client_address(peer, request.headers.get("x-forwarded-for"), ctx.settings.trusted_proxies)


CurrentActor = Annotated[Actor, Depends(current_actor)]
Context = Annotated[ApiContext, Depends(api_context)]
