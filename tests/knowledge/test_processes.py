"""Two processes on one embedded Chroma folder: a search in this process sees what another process ingested since it
last searched (an embedded Chroma keeps each collection's index in memory and would answer from the stale one)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.knowledge.retrieval import search
from tests.knowledge.conftest import text_file

OTHER_PROCESS = textwrap.dedent(
    """
    import sys
    from callbot_core.access.permissions import LOCAL_OPERATOR
    from callbot_core.knowledge.index import KnowledgeBase
    from callbot_core.settings import Settings
    from callbot_core.store import Store
    from tests.knowledge.conftest import BagOfWords, text_file
    from callbot_core.backends.embeddings import embedders

    embedders.register("test-bow", lambda settings: BagOfWords())
    settings = Settings(_env_file=None, database_url=sys.argv[1], runtime_dir=sys.argv[2], embedder="test-bow")
    kb = KnowledgeBase(Store(sys.argv[1]), settings)
    kb.ingest("clinic", [text_file("roof.txt", "The helicopter landing pad is on the roof.")], actor=LOCAL_OPERATOR)
    """
)


def test_a_search_sees_another_processs_ingest(clinic: KnowledgeBase) -> None:
    assert search(clinic, "clinic", "helicopter landing pad roof", k=1).hits[0].source != "roof.txt"
    subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, clinic.store.url, str(clinic.settings.resolved_runtime_dir())],
        check=True,
        timeout=120,
    )
    assert search(clinic, "clinic", "helicopter landing pad roof", k=1).hits[0].source == "roof.txt"
    clinic.ingest("clinic", [text_file("lift.txt", "The lift is next to the stairs.")], actor=LOCAL_OPERATOR)
    assert search(clinic, "clinic", "where is the lift", k=1).hits[0].source == "lift.txt"
