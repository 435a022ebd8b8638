"""Chroma as the vector store: embedded (a PersistentClient under the runtime folder) or a server (`chroma run`, an
HttpClient) when `CALLBOT_CHROMA_URL` is set.

Why it looks the way it does:
- Own vectors only. We always pass `embeddings=` and create and fetch collections with `embedding_function=None`:
  a collection with Chroma's default embedding function would download a model the first time anything handed it
  text (which fails offline), so Chroma never gets text, and never a function that could fetch one.
- Names. Our collection `docs` is Chroma's `cb_docs`, so `collections()` lists only ours on a server others use too.
  Chroma wants names that end in a letter or digit; ours may end in `_` or `-`, which then get an `X` appended (our
  names are lowercase, so an uppercase X can only be that mark).
- Similarity. Collections use the cosine space, where Chroma's distance is 1 - cosine (0 to 2); we report
  1 - distance clamped to [0, 1]: 1 is the same direction, 0 is unrelated (orthogonal) or opposite.
- A collection records the embedder that made it (name and dimensions) in its metadata; opening it for another one
  is refused, and vectors of the wrong length are refused before Chroma sees them, with both numbers.
- Errors. A server that is down, refuses or stalls becomes `BackendUnavailable` / `BackendTimeout` naming the URL;
  anything else Chroma raises becomes `BackendResponseError`. The HTTP client Chroma builds has no timeout at all,
  so we set one on it and probe the heartbeat (with that timeout) before Chroma's own first requests.
- One embedded client per folder per process: Chroma shares one engine per path and refuses a second client on the
  same path with other settings, so clients are cached here by path.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import chromadb
import httpx
from chromadb.api import ClientAPI
from chromadb.api.base_http_client import BaseHTTPClient
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import NotFoundError

from callbot_core.backends.vectors import EmbedderMismatch, VectorHit
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
)
from callbot_core.settings import Settings

BACKEND = "chroma"
FOLDER = "chroma"  # under the runtime folder
PREFIX = "cb_"
_END_MARK = "X"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,61}$")
EMBEDDER_KEY = "callbot_embedder"
DIMENSIONS_KEY = "callbot_dimensions"
SPACE = "cosine"

CONNECT_TIMEOUT_S = 5.0
# Upserting a full batch (~5,000 vectors of a few hundred floats) takes a server a few seconds; a minute means stuck.
READ_TIMEOUT_S = 60.0
# Failures before the server said anything: every call we make is idempotent (upserts, deletes, reads), so one retry
# rides out a server restart or a keep-alive connection it closed.
_RETRYABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
RETRY_DELAY_S = 0.25
_LIST_PAGE = 1000
_MAX_MESSAGE = 300

T = TypeVar("T")


def chroma_name(collection: str) -> str:
    """Chroma's name for our collection `collection`."""
    if not isinstance(collection, str) or not NAME_PATTERN.match(collection):
        raise InvalidInput(f"Invalid vector collection name {collection!r}: use [a-z0-9][a-z0-9_-]{{0,61}}")
    return PREFIX + collection + ("" if collection[-1].isalnum() else _END_MARK)


def our_name(name: str) -> str | None:
    """Our name for Chroma's collection `name`, or None when it is not one of ours."""
    if not name.startswith(PREFIX):
        return None
    ours = name[len(PREFIX) :]
    if ours.endswith(_END_MARK):
        ours = ours[: -len(_END_MARK)]
    return ours if NAME_PATTERN.match(ours) and chroma_name(ours) == name else None


def _chroma_settings() -> ChromaSettings:
    # Telemetry off: nothing leaves the machine. Reset off: nothing here wipes a store.
    return ChromaSettings(anonymized_telemetry=False, allow_reset=False)


_persistent: dict[str, ClientAPI] = {}
_persistent_lock = threading.Lock()


def persistent_client(path: Path) -> ClientAPI:
    """The process's one embedded client for the folder `path` (created on first use)."""
    key = str(path.resolve())
    with _persistent_lock:
        client = _persistent.get(key)
        if client is None:
            Path(key).mkdir(parents=True, exist_ok=True)
            client = chromadb.PersistentClient(path=key, settings=_chroma_settings())
            _persistent[key] = client
        return client


def reload_persistent_client(path: Path) -> None:
    """Close the process's embedded client for `path`; the next call opens it again from disk. An embedded client
    keeps each collection's index in memory and does not see vectors another process added since (measured: its
    count moves, its queries do not)."""
    key = str(path.resolve())
    with _persistent_lock:
        client = _persistent.pop(key, None)
    if client is not None:
        client.close()


def close_persistent_clients() -> None:
    """Close every embedded client this process opened (each holds a few threads and files); stores reopen theirs
    on their next call. For test sessions that open many runtime folders, and for shutdown."""
    with _persistent_lock:
        clients = list(_persistent.values())
        _persistent.clear()
    for client in clients:
        client.close()


@dataclass(frozen=True, slots=True)
class _Handle:
    collection: Collection
    embedder: str | None
    dimensions: int | None


def _recorded(metadata: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    metadata = metadata or {}
    embedder, dimensions = metadata.get(EMBEDDER_KEY), metadata.get(DIMENSIONS_KEY)
    return (
        embedder if isinstance(embedder, str) else None,
        dimensions if isinstance(dimensions, int) and not isinstance(dimensions, bool) else None,
    )


def _describe(embedder: str | None, dimensions: int | None) -> str:
    if embedder is None and dimensions is None:
        return "an unrecorded embedder"
    return f"embedder {embedder or '(unrecorded)'} ({dimensions if dimensions is not None else '?'} dimensions)"


def _floats(vector: Sequence[float]) -> list[float]:
    tolist = getattr(vector, "tolist", None)  # numpy arrays: one C call instead of a Python loop
    return [float(x) for x in (tolist() if tolist is not None else vector)]


def _similarity(distance: float | None) -> float:
    if distance is None or not math.isfinite(distance):
        return 0.0
    return min(1.0, max(0.0, 1.0 - float(distance)))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


class ChromaVectorStore:
    """Our collections in one Chroma: an embedded folder (`path`) or a server (`url`)."""

    name = BACKEND

    def __init__(
        self,
        *,
        path: Path | None = None,
        url: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        if (path is None) == (url is None):
            raise ValueError("ChromaVectorStore needs exactly one of path and url")
        self._path = path
        self._url: str | None = None
        if url is not None:
            url = url.strip().rstrip("/")
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigError(f"CALLBOT_CHROMA_URL must be an http:// or https:// URL, not {url!r}")
            self._url = url
        self.where = self._url or str(path)
        self._at = f"Chroma at {self._url}" if self._url else f"embedded Chroma in {path}"
        self._timeout = httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=connect_timeout_s
        )
        self._lock = threading.RLock()
        self._http: ClientAPI | None = None
        # Collection objects by Chroma name, for the client they came from (a closed embedded client is replaced).
        self._handles: dict[str, _Handle] = {}
        self._handles_client: ClientAPI | None = None
        self._max_batch: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ChromaVectorStore:
        if settings.chroma_url:
            return cls(url=settings.chroma_url)
        return cls(path=settings.resolved_runtime_dir() / FOLDER)

    # --- the protocol -----------------------------------------------------------------------------------------

    def open_collection(self, collection: str, *, embedder: str, dimensions: int) -> None:
        name = chroma_name(collection)
        if not isinstance(dimensions, int) or dimensions < 1:
            raise InvalidInput(f"A vector collection needs a positive number of dimensions, not {dimensions!r}")
        client = self._client()
        metadata: dict[str, str | int] = {EMBEDDER_KEY: embedder, DIMENSIONS_KEY: dimensions}
        # get_or_create leaves an existing collection's metadata and configuration as they are: what it returns is
        # what the collection recorded when it was made.
        found = self._call(
            f"open collection {collection!r}",
            lambda: client.get_or_create_collection(
                name, configuration={"hnsw": {"space": SPACE}}, metadata=metadata, embedding_function=None
            ),
        )
        handle = _Handle(found, *_recorded(found.metadata))
        if (handle.embedder, handle.dimensions) != (embedder, dimensions):
            raise EmbedderMismatch(
                f"Vector collection {collection!r} in {self._at} was made by"
                f" {_describe(handle.embedder, handle.dimensions)}, not by {_describe(embedder, dimensions)}"
            )
        # The raw JSON: the parsed `configuration` warns about the "legacy" (absent) embedding function we chose.
        space = ((found.configuration_json or {}).get("hnsw") or {}).get("space")
        if space not in (None, SPACE):
            raise Conflict(f"Vector collection {collection!r} in {self._at} uses the {space} space, not {SPACE}")
        with self._lock:
            self._handles[name] = handle

    def add(self, collection: str, ids: Sequence[str], vectors: Sequence[Sequence[float]]) -> None:
        if len(ids) != len(vectors):
            raise ValueError(f"add() got {len(ids)} ids but {len(vectors)} vectors")
        if not ids:
            return
        id_list = list(ids)
        # Chroma refuses repeats within one call but not across our batches: refuse them all alike.
        seen: set[str] = set()
        for id_ in id_list:
            if id_ in seen:
                raise ValueError(f"add() got the id {id_!r} more than once")
            seen.add(id_)
        rows = [_floats(v) for v in vectors]

        def upsert(handle: _Handle) -> None:
            for i, row in enumerate(rows):
                self._check_length(collection, handle, len(row), f"vector {i} (id {id_list[i]!r})")
            size = self._batch_size()
            for start in range(0, len(id_list), size):
                handle.collection.upsert(ids=id_list[start : start + size], embeddings=rows[start : start + size])

        self._on_collection(collection, f"add vectors to {collection!r}", upsert, missing=self._missing(collection))

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        id_list = list(ids)
        if not id_list:
            return  # nothing to do (Chroma would refuse an empty id list)

        def remove(handle: _Handle) -> None:
            size = self._batch_size()
            for start in range(0, len(id_list), size):
                handle.collection.delete(ids=id_list[start : start + size])

        self._on_collection(collection, f"delete vectors from {collection!r}", remove, missing=lambda: None)

    def query(self, collection: str, vector: Sequence[float], k: int) -> list[VectorHit]:
        if not isinstance(k, int) or k < 1:
            raise InvalidInput(f"A vector query needs k of at least 1, not {k!r}")
        query = _floats(vector)

        def nearest(handle: _Handle) -> list[VectorHit]:
            self._check_length(collection, handle, len(query), "the query vector")
            result = handle.collection.query(query_embeddings=[query], n_results=k, include=["distances"])
            ids = (result.get("ids") or [[]])[0]
            distances = (result.get("distances") or [[]])[0]
            hits = [VectorHit(str(i), _similarity(d)) for i, d in zip(ids, distances, strict=False)]
            return sorted(hits, key=lambda hit: -hit.similarity)  # stable: Chroma's order among equals

        return self._on_collection(collection, f"query {collection!r}", nearest, missing=self._missing(collection))

    def count(self, collection: str) -> int:
        """How many vectors the collection holds (0 when it does not exist)."""
        return self._on_collection(
            collection, f"count {collection!r}", lambda h: int(h.collection.count()), missing=lambda: 0
        )

    def drop(self, collection: str) -> None:
        name = chroma_name(collection)
        client = self._client()
        with self._lock:
            self._handles.pop(name, None)
        with contextlib.suppress(NotFoundError):  # already gone
            self._call(f"drop collection {collection!r}", lambda: client.delete_collection(name))

    def collections(self) -> list[str]:
        client = self._client()
        names: list[str] = []
        offset = 0
        while True:
            page = self._call("list collections", lambda o=offset: client.list_collections(limit=_LIST_PAGE, offset=o))
            names.extend(c.name for c in page)
            if len(page) < _LIST_PAGE:
                break
            offset += len(page)
        return sorted(ours for n in names if (ours := our_name(n)) is not None)

    def health(self) -> None:
        client = self._client()
        self._call("answer a heartbeat", client.heartbeat)

    # --- beyond the protocol ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close a server connection (an embedded client is shared per folder: see `close_persistent_clients`)."""
        with self._lock:
            client, self._http = self._http, None
            self._handles.clear()
            self._handles_client = None
        if client is not None:
            client.close()

    def reload(self) -> None:
        """See changes another process made: an embedded store reopens its folder; a server needs nothing."""
        if self._path is not None:
            reload_persistent_client(self._path)

    # --- internals --------------------------------------------------------------------------------------------

    def _client(self) -> ClientAPI:
        path = self._path
        if path is not None:
            client = self._call("open its folder", lambda: persistent_client(path))
        else:
            with self._lock:
                if self._http is None:
                    self._http = self._connect()
                client = self._http
        with self._lock:
            if client is not self._handles_client:
                self._handles.clear()
                self._handles_client = client
                self._max_batch = None
        return client

    def _connect(self) -> ClientAPI:
        url = self._url
        assert url is not None
        ssl = url.startswith("https://")
        api = BaseHTTPClient.resolve_url(url, chroma_server_ssl_enabled=ssl, default_api_path="/api/v2")
        # Chroma's client sends its first requests while being built, through an httpx client without a timeout:
        # a server that accepts connections but never answers would hang us there. Probe first, with ours.
        with httpx.Client(timeout=self._timeout, trust_env=False) as probe:
            self._call("answer a heartbeat", lambda: probe.get(api + "/heartbeat").raise_for_status())
        try:
            client = self._call(
                "accept a client", lambda: chromadb.HttpClient(host=url, ssl=ssl, settings=_chroma_settings())
            )
        except BackendResponseError as exc:
            # Chroma's client checks the tenant and database while being built; refusing them is refusing us.
            raise BackendUnavailable(str(exc), backend=BACKEND, where=self.where) from exc
        session = getattr(getattr(client, "_server", None), "_session", None)
        if isinstance(session, httpx.Client):
            session.timeout = self._timeout
        return client

    def _call(self, doing: str, fn: Callable[[], T]) -> T:
        """Run one Chroma call, turning its failures into ours (NotFoundError passes: callers decide what it means)."""
        for attempt in (1, 2):
            try:
                return fn()
            except (CallbotError, NotFoundError):
                raise
            except _RETRYABLE as exc:
                if attempt == 2 or self._url is None:
                    raise self._error(doing, exc) from exc
                time.sleep(RETRY_DELAY_S)
            except Exception as exc:  # chromadb raises ValueError, bare Exception and its own errors alike
                raise self._error(doing, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, doing: str, exc: Exception) -> BackendError:
        kw = {"backend": BACKEND, "where": self.where}
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendUnavailable(
                f"{self._at} is not reachable: no connection within {self._timeout.connect:.1f} s", **kw
            )
        if isinstance(exc, httpx.TimeoutException):
            return BackendTimeout(f"{self._at} did not {doing} within {self._timeout.read:.1f} s", **kw)
        if isinstance(exc, httpx.ConnectError):
            return BackendUnavailable(f"{self._at} is not reachable: {_one_line(exc)}", **kw)
        if isinstance(exc, httpx.TransportError):
            return BackendUnavailable(f"{self._at} dropped the connection (trying to {doing}): {_one_line(exc)}", **kw)
        if isinstance(exc, httpx.HTTPStatusError):
            return BackendResponseError(
                f"{self._at} answered HTTP {exc.response.status_code} (trying to {doing}); is it a Chroma server?",
                **kw,
            )
        return BackendResponseError(f"{self._at} could not {doing}: {_one_line(exc)}", **kw)

    def _missing(self, collection: str) -> Callable[[], Any]:
        def fail() -> Any:
            raise NotFound(f"No vector collection {collection!r} in {self._at}: open it first")

        return fail

    def _handle(self, collection: str, *, fresh: bool = False) -> _Handle | None:
        """The collection's Chroma object and what it recorded (None when it does not exist)."""
        name = chroma_name(collection)
        client = self._client()
        if not fresh:
            with self._lock:
                cached = self._handles.get(name)
            if cached is not None:
                return cached
        try:
            found = self._call(
                f"open collection {collection!r}", lambda: client.get_collection(name, embedding_function=None)
            )
        except NotFoundError:
            with self._lock:
                self._handles.pop(name, None)
            return None
        handle = _Handle(found, *_recorded(found.metadata))
        with self._lock:
            self._handles[name] = handle
        return handle

    def _on_collection(self, collection: str, doing: str, op: Callable[[_Handle], T], *, missing: Callable[[], T]) -> T:
        handle = self._handle(collection)
        if handle is None:
            return missing()
        try:
            return self._call(doing, lambda: op(handle))
        except NotFoundError:
            pass
        # Our cached object names a collection someone dropped (and maybe made again) since: look it up once more.
        handle = self._handle(collection, fresh=True)
        if handle is None:
            return missing()
        try:
            return self._call(doing, lambda: op(handle))
        except NotFoundError:
            return missing()

    def _check_length(self, collection: str, handle: _Handle, length: int, what: str) -> None:
        if handle.dimensions is not None and length != handle.dimensions:
            raise InvalidInput(
                f"The {what} has {length} dimensions, but vector collection {collection!r} holds"
                f" {handle.dimensions}-dimension vectors ({_describe(handle.embedder, handle.dimensions)})"
            )

    def _batch_size(self) -> int:
        with self._lock:
            if self._max_batch is not None:
                return self._max_batch
        client = self._client()
        size = self._call("report its batch size", client.get_max_batch_size)
        size = size if isinstance(size, int) and size > 0 else 1000
        with self._lock:
            self._max_batch = size
        return size
