"""Serving the API: `callbot api` runs this under uvicorn."""

from __future__ import annotations

import uvicorn

from callbot_core.api.app import create_app
from callbot_core.conversations.logs import configure_logging
from callbot_core.settings import Settings


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted. One worker process: the embedded model is one per process (scale out with
    replicas behind a proxy, sharing PostgreSQL and Redis)."""
    configure_logging(settings)
    app = create_app(settings)
    # log_config=None: uvicorn keeps the JSON logging set up above; its access log is off (ours has route and user).
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, log_config=None, access_log=False)
