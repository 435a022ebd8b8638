"""The HTTP API: one more thin front end over the engine (FastAPI; the only package that imports it).

`create_app` builds the application; `callbot api` serves it under uvicorn. Routes parse input, call the engine as
the request's actor (`auth.py`: a bearer JWT from `POST /v1/auth/token`, or an API key) and render; permissions are
the engine's (`access.permissions`), narrowed by a key's scopes.
"""

from callbot_core.api.app import create_app

__all__ = ["create_app"]
