"""The Chroma vector store, run the same way against the embedded PersistentClient (a folder under the test's runtime
dir) and a real `chroma run` server: similarities from small hand-made vectors, upserts, deletes, drops, the
embedder a collection records, dimension checks, batches bigger than Chroma takes at once, persistence, and what a
down or stalled server looks like to the caller."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from callbot_core.backends.vectors import (
    EmbedderMismatch,
    VectorHit,
    VectorStore,
    get_vector_store,
    vector_stores,
)
from callbot_core.backends.vectors.chroma import (
    ChromaVectorStore,
    chroma_name,
    close_persistent_clients,
    our_name,
    persistent_client,
)
from callbot_core.errors import BackendTimeout, BackendUnavailable, Conflict, InvalidInput, NotFound
from callbot_core.settings import Settings
from tests.chroma_server import ChromaServer, free_port

MODES = [pytest.param("embedded", id="embedded"), pytest.param("server", id="server")]
EMB = "test-emb"


@pytest.fixture(autouse=True)
def _no_default_embedding_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chroma's default embedding function downloads a model: any use of it is a bug here (and fails offline)."""
    from chromadb.api.types import DefaultEmbeddingFunction
    from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

    def embed(self: object, input: object) -> None:  # Chroma checks this signature when it builds a Collection
        raise AssertionError("Chroma's default embedding function was used")

    def download(self: object) -> None:
        raise AssertionError("Chroma tried to download its default embedding model")

    monkeypatch.setattr(DefaultEmbeddingFunction, "__call__", embed)
    monkeypatch.setattr(ONNXMiniLM_L6_V2, "_download_model_if_not_exists", download)


@pytest.fixture(scope="module", autouse=True)
def _close_embedded_clients() -> Iterator[None]:
    # Every test opens a folder of its own; each embedded client holds a few threads and files until closed.
    yield
    close_persistent_clients()


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(_env_file=None, env="test", runtime_dir=tmp_path / "runtime", **kw)  # type: ignore[call-arg]


@pytest.fixture(params=MODES)
def vector_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "embedded":
        return _settings(tmp_path)
    return _settings(tmp_path, chroma_url=request.getfixturevalue("chroma_url"))


@pytest.fixture
def store(vector_settings: Settings) -> Iterator[ChromaVectorStore]:
    made = ChromaVectorStore.from_settings(vector_settings)
    yield made
    made.close()


@pytest.fixture
def coll() -> str:
    """A collection name of the test's own: the server is shared by the whole session."""
    return f"t{uuid.uuid4().hex[:12]}"


def _ids(hits: list[VectorHit]) -> list[str]:
    return [hit.id for hit in hits]


# --- registry and names -------------------------------------------------------------------------------------------


def test_registered_as_the_default_vector_store(tmp_path: Path) -> None:
    assert "chroma" in vector_stores.names()
    settings = _settings(tmp_path)
    store = get_vector_store(settings=settings)
    assert isinstance(store, ChromaVectorStore) and isinstance(store, VectorStore)
    assert store.name == "chroma"
    assert store.where == str(tmp_path / "runtime" / "chroma")
    assert get_vector_store(settings=settings) is store  # one per settings object
    # A URL makes it a server client, built without connecting (nothing answers there).
    remote = get_vector_store("chroma", _settings(tmp_path, chroma_url="http://127.0.0.1:9/"))
    assert remote.where == "http://127.0.0.1:9"


def test_names_map_to_chroma_and_back() -> None:
    for ours in ["docs", "a", "kb-1f3a", "under_", "dash-", "x" * 62]:
        name = chroma_name(ours)
        assert name.startswith("cb_") and name[-1].isalnum()
        assert our_name(name) == ours
    assert chroma_name("docs") == "cb_docs"
    for foreign in ["docs", "cb_Docs", "cb_docsX", "other_cb_docs", "cb_"]:
        assert our_name(foreign) is None
    for bad in ["", "Docs", "-docs", "a" * 63, "a.b", "cb docs"]:
        with pytest.raises(InvalidInput):
            chroma_name(bad)


def test_one_embedded_client_per_folder(tmp_path: Path) -> None:
    folder = tmp_path / "chroma"
    client = persistent_client(folder)
    assert persistent_client(tmp_path / "x" / ".." / "chroma") is client


# --- behaviour, embedded and server -------------------------------------------------------------------------------


def test_query_orders_by_cosine_similarity(store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder=EMB, dimensions=4)
    store.add(
        coll,
        ["same", "near", "orthogonal", "opposite"],
        [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0], [-1, 0, 0, 0]],
    )
    hits = store.query(coll, [1, 0, 0, 0], 10)  # k above the count is fine
    assert _ids(hits) == ["same", "near", "orthogonal", "opposite"]
    sims = [hit.similarity for hit in hits]
    assert sims[0] == pytest.approx(1.0, abs=1e-4)  # same direction, whatever the length
    assert sims[1] == pytest.approx(0.7071, abs=1e-3)
    assert sims[2] == pytest.approx(0.0, abs=1e-4)
    assert sims[3] == 0.0  # opposite is clamped, not negative
    assert all(0.0 <= s <= 1.0 for s in sims)
    assert store.query(coll, [0, 1, 0, 0], 2)[0].id == "near"
    assert len(store.query(coll, [1, 0, 0, 0], 1)) == 1


def test_add_upserts_and_delete_ignores_unknown_ids(store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder=EMB, dimensions=4)
    assert store.query(coll, [1, 0, 0, 0], 5) == []  # empty collection
    assert store.count(coll) == 0
    store.add(coll, ["a", "b", "c"], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    store.add(coll, ["a"], [[0, 0, 0, 1]])  # replaces a's vector
    assert store.count(coll) == 3
    top = store.query(coll, [0, 0, 0, 1], 1)[0]
    assert top.id == "a" and top.similarity == pytest.approx(1.0, abs=1e-4)
    store.delete(coll, ["b", "no-such-id"])
    store.delete(coll, [])
    assert store.count(coll) == 2
    assert "b" not in _ids(store.query(coll, [0, 1, 0, 0], 10))
    store.add(coll, [], [])  # nothing to do


def test_missing_collections(store: ChromaVectorStore, coll: str) -> None:
    assert store.count(coll) == 0
    store.delete(coll, ["a"])
    store.drop(coll)
    with pytest.raises(NotFound, match=coll):
        store.query(coll, [1, 0, 0, 0], 3)
    with pytest.raises(NotFound, match="open it first"):
        store.add(coll, ["a"], [[1, 0, 0, 0]])


def test_drop_and_list_only_our_collections(store: ChromaVectorStore, coll: str) -> None:
    other, trailing = coll + "-b", coll + "_"
    for name in (coll, other, trailing):
        store.open_collection(name, embedder=EMB, dimensions=4)
    store.add(coll, ["a"], [[1, 0, 0, 0]])
    client = store._client()
    client.get_or_create_collection(f"foreign{coll}", embedding_function=None)  # not ours: no prefix
    client.get_or_create_collection(f"cb_{coll}X", embedding_function=None)  # prefixed, but not a name we make
    listed = store.collections()
    assert {coll, other, trailing} <= set(listed)
    assert listed == sorted(listed)
    assert not [n for n in listed if n.startswith("foreign") or n.startswith("cb_") or n.endswith("X")]
    store.drop(coll)
    store.drop(coll)  # missing is fine
    assert coll not in store.collections()
    assert store.count(coll) == 0
    store.open_collection(coll, embedder=EMB, dimensions=4)  # made again: empty
    assert store.count(coll) == 0
    client.delete_collection(f"foreign{coll}")
    client.delete_collection(f"cb_{coll}X")


def test_a_collection_records_its_embedder(store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder="minilm", dimensions=4)
    store.open_collection(coll, embedder="minilm", dimensions=4)  # the same again is fine
    with pytest.raises(EmbedderMismatch) as by_name:
        store.open_collection(coll, embedder="other-model", dimensions=4)
    assert "minilm" in str(by_name.value) and "other-model" in str(by_name.value)
    assert isinstance(by_name.value, Conflict)
    with pytest.raises(EmbedderMismatch) as by_dims:
        store.open_collection(coll, embedder="minilm", dimensions=8)
    assert "4 dimensions" in str(by_dims.value) and "8 dimensions" in str(by_dims.value)
    store.open_collection(coll, embedder="minilm", dimensions=4)  # the refused opens recorded nothing
    collection = store._client().get_collection(chroma_name(coll), embedding_function=None)
    assert collection.configuration_json["hnsw"]["space"] == "cosine"
    assert collection.configuration_json["embedding_function"] == {"type": "legacy"}  # i.e. none


def test_vector_lengths_are_checked(store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder=EMB, dimensions=4)
    with pytest.raises(InvalidInput, match=r"has 3 dimensions.*4-dimension"):
        store.add(coll, ["a", "b"], [[1, 0, 0, 0], [1, 0, 0]])
    with pytest.raises(InvalidInput, match=r"has 5 dimensions.*4-dimension"):
        store.query(coll, [1, 0, 0, 0, 0], 3)
    with pytest.raises(ValueError, match="2 ids but 1 vectors"):
        store.add(coll, ["a", "b"], [[1, 0, 0, 0]])
    with pytest.raises(ValueError, match="'a' more than once"):
        store.add(coll, ["a", "a"], [[1, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(InvalidInput):
        store.query(coll, [1, 0, 0, 0], 0)
    assert store.count(coll) == 0  # nothing of a refused add was stored


def test_more_vectors_than_one_batch(store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder=EMB, dimensions=4)
    batch = store._batch_size()
    n = max(6000, batch + 1)
    rng = random.Random(7)
    vectors = [[rng.uniform(0.1, 1), rng.uniform(0.1, 1), rng.uniform(0.1, 1), rng.uniform(0.1, 1)] for _ in range(n)]
    vectors[-1] = [-1.0, -1.0, -1.0, 1.0]  # in the last batch, and the only one pointing this way
    ids = [f"v{i}" for i in range(n)]
    store.add(coll, ids, vectors)
    assert store.count(coll) == n
    assert store.query(coll, [-1, -1, -1, 1], 1)[0].id == ids[-1]
    store.delete(coll, ids[: batch + 10])  # deletes are batched too
    assert store.count(coll) == n - batch - 10


def test_a_new_store_sees_stored_vectors(vector_settings: Settings, store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder=EMB, dimensions=4)
    store.add(coll, ["a", "b"], [[1, 0, 0, 0], [0, 1, 0, 0]])
    if vector_settings.chroma_url is None:
        close_persistent_clients()  # the next store reads the folder from disk, not a client's memory
    again = ChromaVectorStore.from_settings(vector_settings.model_copy())
    try:
        assert again is not store
        assert again.count(coll) == 2
        assert _ids(again.query(coll, [0, 1, 0, 0], 1)) == ["b"]
        with pytest.raises(EmbedderMismatch):
            again.open_collection(coll, embedder=EMB, dimensions=3)
        assert coll in again.collections()
        # The first store carries on (an embedded one reopens its folder).
        assert store.count(coll) == 2
    finally:
        again.close()


def test_concurrent_adds_and_queries(store: ChromaVectorStore, coll: str) -> None:
    store.open_collection(coll, embedder=EMB, dimensions=4)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        rng = random.Random(worker)
        try:
            for round_ in range(10):
                ids = [f"w{worker}-{round_}-{i}" for i in range(20)]
                store.add(coll, ids, [[rng.random() for _ in range(4)] for _ in ids])
                assert len(store.query(coll, [1, 0, 0, 0], 5)) == 5
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert store.count(coll) == 4 * 10 * 20


# --- a server that is not there, stalls, or goes away ---------------------------------------------------------------


def test_a_down_server_is_unavailable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = ChromaVectorStore.from_settings(_settings(tmp_path, chroma_url=url))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        store.health()
    assert time.monotonic() - started < 5
    assert url in str(raised.value) and "\n" not in str(raised.value)
    assert raised.value.backend == "chroma" and raised.value.where == url
    with pytest.raises(BackendUnavailable, match=url):
        store.count("docs")
    with pytest.raises(BackendUnavailable, match=url):
        store.open_collection("docs", embedder=EMB, dimensions=4)


def test_a_stalled_server_times_out(tmp_path: Path) -> None:
    # A socket that listens but never accepts: connections complete in the kernel's backlog, no answer ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        store = ChromaVectorStore(url=url, connect_timeout_s=0.5, read_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(BackendTimeout) as raised:
            store.health()
        assert time.monotonic() - started < 5
        assert url in str(raised.value) and raised.value.where == url


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_server_that_stalls_or_stops_mid_use(tmp_path: Path, coll: str) -> None:
    """After Chroma's client is built (its own HTTP client has no timeout; ours must apply), a frozen server times out,
    a thawed one answers again, and a stopped one is unavailable."""
    server = ChromaServer(tmp_path / "data")
    try:
        server.start()
    except Exception as exc:  # the session fixture decides skip or fail; this one follows the same rule
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"chroma run did not start: {exc}")
    store = ChromaVectorStore(url=server.url, connect_timeout_s=0.5, read_timeout_s=0.5)
    try:
        store.open_collection(coll, embedder=EMB, dimensions=4)
        store.add(coll, ["a"], [[1, 0, 0, 0]])
        assert server._proc is not None
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BackendTimeout, match=server.url):
                store.count(coll)
            assert time.monotonic() - started < 5
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
        assert store.count(coll) == 1
        server.stop()
        with pytest.raises(BackendUnavailable, match=server.url):
            store.query(coll, [1, 0, 0, 0], 1)
        with pytest.raises(BackendUnavailable, match=server.url):
            store.health()
    finally:
        store.close()
        server.stop()


def test_a_collection_made_again_elsewhere_is_followed(
    vector_settings: Settings, store: ChromaVectorStore, coll: str
) -> None:
    """Another store (another process, in real life) drops the collection and makes it again for another embedder:
    this store's cached handle is stale, and it notices instead of writing into the old one."""
    store.open_collection(coll, embedder=EMB, dimensions=4)
    store.add(coll, ["a"], [[1, 0, 0, 0]])
    other = ChromaVectorStore.from_settings(vector_settings.model_copy())
    try:
        other.drop(coll)
        other.open_collection(coll, embedder="bigger", dimensions=6)
        assert store.count(coll) == 0
        with pytest.raises(InvalidInput, match=r"has 4 dimensions.*6-dimension"):
            store.add(coll, ["b"], [[1, 0, 0, 0]])
        store.add(coll, ["b"], [[1, 0, 0, 0, 0, 0]])
        assert _ids(other.query(coll, [1, 0, 0, 0, 0, 0], 5)) == ["b"]
        other.drop(coll)
        with pytest.raises(NotFound):
            store.query(coll, [1, 0, 0, 0, 0, 0], 1)
    finally:
        other.close()
