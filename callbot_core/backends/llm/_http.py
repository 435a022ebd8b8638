"""What the HTTP backends share: one client setup, one retry rule, one way of naming failures.

Every error raised from here says which server failed, at what address, and how, because front ends
show `BackendError` messages as they are.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from callbot_core.backends.llm.base import estimate_tokens
from callbot_core.errors import BackendError, BackendResponseError, BackendTimeout, BackendUnavailable

# Errors that mean "the connection failed before the server said anything": safe to retry once,
# because no token can have reached the caller. A timeout is not among them: retrying would
# double a wait the user has already sat through.
_RETRYABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# Long enough for a server that is restarting to take the next connection, short enough not to show.
RETRY_DELAY_S = 0.25
MAX_BODY_CHARS = 300


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Who a request goes to, in the words error messages use."""

    label: str  # "Ollama", "OpenAI-compatible server"
    backend: str  # the backend's registry name
    where: str  # the base URL

    @property
    def at(self) -> str:
        return f"{self.label} at {self.where}"


def make_client(
    base_url: str,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    headers: Mapping[str, str] | None = None,
) -> httpx.Client:
    """An httpx client whose read timeout is the longest silence allowed between two stream chunks."""
    timeout = httpx.Timeout(
        connect=connect_timeout_s,
        read=read_timeout_s,
        # A request body is a few kilobytes of chat history: writing it is as quick as connecting.
        write=connect_timeout_s,
        pool=connect_timeout_s,
    )
    # trust_env=False: a proxy from the environment must not capture calls to a local model server.
    return httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=dict(headers or {}), trust_env=False)


def _reason(exc: BaseException) -> str:
    """The innermost useful text of a transport error ("[Errno 111] Connection refused")."""
    text = str(exc).strip()
    return text or type(exc).__name__


def _timeout_s(client: httpx.Client, kind: str) -> str:
    value = getattr(client.timeout, kind, None)
    return f"{value:.1f} s" if isinstance(value, int | float) else "the configured time"


def trim_body(text: str) -> str:
    """A short, one-line account of an error body: the JSON `error` field when there is one."""
    message: Any = None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail"))
        if isinstance(error, dict):
            # OpenAI's shape: {"error": {"message": ..., "type": ...}}
            message = error.get("message") or error.get("type")
        elif error is not None:
            message = error
    if message is None:
        message = text
    if not isinstance(message, str):
        message = json.dumps(message)
    message = " ".join(message.split())
    if len(message) > MAX_BODY_CHARS:
        message = message[: MAX_BODY_CHARS - 1] + "…"
    return message or "(empty body)"


def status_error(ep: Endpoint, status: int, body: str, hints: Mapping[int, str] | None = None) -> BackendResponseError:
    message = f"{ep.at} answered HTTP {status}: {trim_body(body)}"
    hint = (hints or {}).get(status)
    if hint:
        message = f"{message} ({hint})"
    return BackendResponseError(message, backend=ep.backend, where=ep.where)


def transport_error(
    exc: httpx.HTTPError, ep: Endpoint, client: httpx.Client, *, tokens: int | None = None
) -> BackendError:
    """Our error for an httpx failure. `tokens` is how many tokens were already yielded, if streaming."""
    kw = {"backend": ep.backend, "where": ep.where}
    if isinstance(exc, httpx.ConnectTimeout):
        return BackendUnavailable(
            f"{ep.at} is not reachable: no connection within {_timeout_s(client, 'connect')} (connect timeout)",
            **kw,
        )
    if isinstance(exc, httpx.ReadTimeout):
        wait = _timeout_s(client, "read")
        if tokens:
            return BackendTimeout(f"{ep.at}: no data for {wait} mid-stream after {tokens} tokens (read timeout)", **kw)
        return BackendTimeout(f"{ep.at}: no answer within {wait} (read timeout)", **kw)
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"{ep.at}: timed out sending the request ({type(exc).__name__})", **kw)
    if isinstance(exc, httpx.ConnectError):
        return BackendUnavailable(f"{ep.at} is not reachable: {_reason(exc)}", **kw)
    if isinstance(exc, httpx.TransportError):
        when = f"mid-stream after {tokens} tokens" if tokens else "before answering"
        return BackendUnavailable(f"{ep.at} dropped the connection {when}: {_reason(exc)}", **kw)
    return BackendError(f"{ep.at}: request failed: {_reason(exc)}", **kw)


def bad_data(ep: Endpoint, what: str, line: str) -> BackendResponseError:
    return BackendResponseError(f"{ep.at} sent {what}: {trim_body(line)}", backend=ep.backend, where=ep.where)


def json_object(ep: Endpoint, text: str, what: str, tokens: int) -> dict[str, Any]:
    """One streamed JSON object (an NDJSON line or an SSE event); an `error` object becomes our error."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise bad_data(ep, f"{what} that is not JSON", text) from exc
    if not isinstance(obj, dict):
        raise bad_data(ep, f"{what} that is not a JSON object", text)
    if "error" in obj:
        raise BackendResponseError(
            f"{ep.at} reported an error mid-stream after {tokens} tokens: {trim_body(text)}",
            backend=ep.backend,
            where=ep.where,
        )
    return obj


def _send_once_retried(client: httpx.Client, request: httpx.Request, ep: Endpoint) -> httpx.Response:
    """Send with exactly one retry when the connection fails before the response headers arrive."""
    for attempt in (1, 2):
        try:
            # stream=True returns as soon as the headers are in: nothing has been yielded yet.
            return client.send(request, stream=True)
        except _RETRYABLE as exc:
            if attempt == 2:
                raise transport_error(exc, ep, client) from exc
            time.sleep(RETRY_DELAY_S)
        except httpx.HTTPError as exc:
            raise transport_error(exc, ep, client) from exc
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def open_stream(
    client: httpx.Client,
    ep: Endpoint,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    hints: Mapping[int, str] | None = None,
) -> Iterator[httpx.Response]:
    """A streaming response with a 2xx status, closed on exit.

    Only the opening is retried; once the caller has started reading (and may have yielded tokens),
    a failure is the caller's to report, with `transport_error(..., tokens=n)`.
    """
    request = client.build_request(method, path, json=json_body)
    response = _send_once_retried(client, request, ep)
    try:
        if not response.is_success:
            try:
                body = response.read().decode("utf-8", "replace")
            except httpx.HTTPError:
                body = ""
            raise status_error(ep, response.status_code, body, hints)
        yield response
    finally:
        response.close()


def get_json(client: httpx.Client, ep: Endpoint, path: str, *, hints: Mapping[int, str] | None = None) -> Any:
    """GET a small JSON document (model lists), with the same retry and error wording as streams."""
    with open_stream(client, ep, "GET", path, hints=hints) as response:
        try:
            raw = response.read()
        except httpx.HTTPError as exc:
            raise transport_error(exc, ep, client) from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad_data(ep, f"a {path} answer that is not JSON", raw.decode("utf-8", "replace")) from exc


class RemoteBackend:
    """What every HTTP backend shares: its address, client, model choice and context assumptions.

    Subclasses set `name` and `label`, implement `stream`, `list_models` and `health`, and say in
    `no_models_hint` what a user should do when the server offers no model.
    """

    name = "remote"
    label = "Server"
    no_models_hint = "set CALLBOT_LLM_MODEL"

    def __init__(
        self,
        base_url: str,
        *,
        default_model: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        context_window: int = 4096,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._configured_model = default_model
        self._discovered_model: str | None = None
        self._context_window = context_window
        self._ep = Endpoint(self.label, self.name, self._base_url)
        self._client = make_client(
            self._base_url, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s, headers=headers
        )
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return self._base_url

    def list_models(self) -> list[str]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def default_model(self) -> str:
        """The configured model, else the first one the server offers (remembered once found)."""
        if self._configured_model:
            return self._configured_model
        with self._lock:
            if self._discovered_model is None:
                models = self.list_models()
                if not models:
                    raise BackendError(
                        f"{self._ep.at} has no models: {self.no_models_hint}",
                        backend=self.name,
                        where=self._base_url,
                    )
                self._discovered_model = models[0]
            return self._discovered_model

    def context_window(self, model: str | None = None) -> int:
        return self._context_window

    def count_tokens(self, text: str, model: str | None = None) -> int:
        # No tokenizer for a remote model here: a conservative estimate keeps trimming on the safe side.
        return estimate_tokens(text)

    def close(self) -> None:
        self._client.close()
