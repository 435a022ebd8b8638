"""Errors the engine raises. Each names what was wrong, so every front end can show it as is."""

from __future__ import annotations


class CallbotError(Exception):
    """Base for every error the engine raises on purpose."""


class ConfigError(CallbotError):
    """The configuration is missing something or contradicts itself."""


class InvalidInput(CallbotError):
    """The caller gave input the engine refuses (empty text, too long, wrong type...)."""


class NotFound(CallbotError):
    """An id or key that names nothing in the store."""


class Conflict(CallbotError):
    """The request contradicts the store's state (a used persona version edited, a user that exists...)."""


class Duplicate(Conflict):
    """A save hit a unique constraint: another session stored the same key first (the store's check, not ours)."""


class BackendError(CallbotError):
    """An LLM backend failed. `backend` and `where` say which one and at what address."""

    def __init__(self, message: str, *, backend: str, where: str = "") -> None:
        super().__init__(message)
        self.backend = backend
        self.where = where


class BackendUnavailable(BackendError):
    """The backend could not be reached or refused the connection."""


class BackendTimeout(BackendError):
    """The backend took too long, before the first token or mid-stream."""


class BackendResponseError(BackendError):
    """The backend answered, but with an error status or a body we cannot read."""


class PermissionDenied(CallbotError):
    """The acting user's role does not allow the action (checked in the engine, so every front end agrees)."""

    def __init__(self, message: str, *, action: str, role: str) -> None:
        super().__init__(message)
        self.action = action
        self.role = role
