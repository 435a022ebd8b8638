"""Signing in with a password (`POST /v1/auth/token` → a JWT) and out; API keys for admins (`/v1/apikeys`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field

from callbot_core.access import apikeys, tokens
from callbot_core.api.auth import Context, CurrentActor, bearer, client_addr, unauthorized
from callbot_core.api.errors import ERROR_RESPONSES, ErrorBody

router = APIRouter(tags=["auth"], responses=ERROR_RESPONSES)

# A refused sign-in says no more than this, whatever the reason (the audit log keeps it).
REFUSED = "Username or password is wrong, or sign-in is paused for this account or address; try again later"


class TokenRequest(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: datetime
    expires_in: int
    username: str
    role: str


@router.post("/v1/auth/token", response_model=TokenResponse)
async def token(body: TokenRequest, request: Request, ctx: Context) -> TokenResponse:
    """A bearer token for a username and password: the app's sign-in (lockout after five wrong guesses, per-address
    throttling, audit), valid for 12 hours or until signed out, the password changes or an admin locks the user."""
    addr = client_addr(request)
    issued = await run_in_threadpool(
        tokens.issue, ctx.store, ctx.secret, body.username, body.password, client_addr=addr
    )
    if issued is None:
        raise unauthorized(REFUSED)
    now = datetime.now(issued.expires_at.tzinfo)
    return TokenResponse(
        access_token=issued.token,
        expires_at=issued.expires_at,
        expires_in=int((issued.expires_at - now).total_seconds()),
        username=issued.user.username,
        role=issued.user.role,
    )


@router.delete("/v1/auth/token", status_code=204)
async def sign_out(
    request: Request,
    ctx: Context,
    actor: CurrentActor,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """Sign this token out (its session ends at once). An API key is revoked with DELETE /v1/apikeys/{id}."""
    credential = creds.credentials if creds is not None else ""
    if apikeys.looks_like_key(credential) or not credential:
        raise unauthorized("Only a token from POST /v1/auth/token signs out; revoke an API key instead")
    await run_in_threadpool(tokens.revoke, ctx.store, ctx.secret, credential, client_addr=client_addr(request))


class KeyOut(BaseModel):
    id: int
    username: str
    name: str
    prefix: str
    scopes: list[str]
    state: str
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, info: apikeys.KeyInfo) -> KeyOut:
        return cls(
            id=info.id, username=info.username, name=info.name, prefix=info.prefix, scopes=list(info.scopes),
            state=info.state(), created_at=info.created_at, created_by=info.created_by, expires_at=info.expires_at,
            revoked_at=info.revoked_at, last_used_at=info.last_used_at,
        )  # fmt: skip


class KeyCreate(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=apikeys.MAX_NAME_CHARS)
    scopes: list[str] = Field(default_factory=lambda: list(apikeys.DEFAULT_SCOPES), max_length=10)
    expires: str | None = Field(None, description="90d, 12h, 30m or never (the default)", max_length=20)


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself: shown this once, never stored")


@router.get("/v1/apikeys", response_model=list[KeyOut], tags=["apikeys"])
async def list_keys(ctx: Context, actor: CurrentActor, username: str | None = None) -> list[KeyOut]:
    """Every API key (admins only), newest first, revoked and expired ones marked."""
    found = await run_in_threadpool(apikeys.list_keys, ctx.store, actor=actor, username=username)
    return [KeyOut.of(k) for k in found]


NO_USER = {404: {"model": ErrorBody, "description": "No such user"}}
NO_KEY = {404: {"model": ErrorBody, "description": "No such key"}}


@router.post("/v1/apikeys", response_model=KeyCreated, status_code=201, tags=["apikeys"], responses=NO_USER)
async def create_key(body: KeyCreate, request: Request, ctx: Context, actor: CurrentActor) -> KeyCreated:
    """Make a key for a user (admins only); the answer holds the key, the only time it is shown."""

    def _create() -> apikeys.NewKey:
        return apikeys.create_key(
            ctx.store, body.username, body.name, actor=actor, scopes=body.scopes,
            expires_in=apikeys.parse_expiry(body.expires), client_addr=client_addr(request),
        )  # fmt: skip

    new = await run_in_threadpool(_create)
    return KeyCreated(**KeyOut.of(new.info).model_dump(), key=new.key)


@router.delete("/v1/apikeys/{key_id}", status_code=204, tags=["apikeys"], responses=NO_KEY)
async def revoke_key(key_id: int, request: Request, ctx: Context, actor: CurrentActor) -> None:
    """Revoke a key (admins only): refused from the next request on."""
    await run_in_threadpool(apikeys.revoke_key, ctx.store, key_id, actor=actor, client_addr=client_addr(request))
