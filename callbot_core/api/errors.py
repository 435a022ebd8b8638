"""One error shape for every failure: `{"error": {"code": "...", "message": "..."}}` with the right status.

`code` is stable (clients branch on it); `message` is one line for a person, the engine's own words. Engine errors
map by class (`ENGINE_ERRORS`); FastAPI's validation errors become `invalid_request` naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from callbot_core.errors import (
    BackendError,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    CallbotError,
    ConfigError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """Raised by routes for what is not an engine error (no credentials, a rate limit...)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Most specific first: the first class that matches wins.
ENGINE_ERRORS: list[tuple[type[CallbotError], int, str]] = [
    (PermissionDenied, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (InvalidInput, 422, "invalid_input"),
    (BackendTimeout, 504, "backend_timeout"),
    (BackendUnavailable, 503, "backend_unavailable"),
    (BackendResponseError, 502, "backend_error"),
    (BackendError, 502, "backend_error"),
    (ConfigError, 500, "config_error"),
    (CallbotError, 500, "error"),
]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

# Documented on every route, so the OpenAPI schema says what an error looks like (schemathesis checks it).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (401, "No valid token or API key"),
        (403, "The actor's role or the key's scopes do not allow this"),
        (413, "The request body is larger than the configured limit"),
        (422, "The input is not valid; the message names what"),
        (429, "Too many requests; see Retry-After"),
    )
}


def engine_status(exc: CallbotError) -> tuple[int, str]:
    for cls, status, code in ENGINE_ERRORS:
        if isinstance(exc, cls):
            return status, code
    return 500, "error"


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    first_line = message.strip().splitlines()[0] if message.strip() else code
    return JSONResponse({"error": {"code": code, "message": first_line}}, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(CallbotError)
    async def _engine(request: Request, exc: CallbotError) -> JSONResponse:
        status, code = engine_status(exc)
        return error_response(status, code, str(exc))

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if not errors:
            return error_response(422, "invalid_request", "The request is not valid")
        first = errors[0]
        if first.get("type") == "json_invalid":
            return error_response(422, "invalid_json", "The body is not valid JSON")
        where = _field(first.get("loc", ()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'not valid')}{more}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log with the request id; the client gets the id to quote, never a traceback.
        import logging

        request_id = getattr(request.state, "request_id", "-")
        logging.getLogger("callbot.api").exception("Unexpected error (request %s)", request_id)
        return error_response(500, "internal_error", f"Unexpected error; quote request id {request_id}")
