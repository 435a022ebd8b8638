"""Health: `/health` (no sign-in: load balancers and Kubernetes probes ask it) and backends' health (signed in)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from callbot_core.api.auth import Context, CurrentActor
from callbot_core.api.errors import ERROR_RESPONSES
from callbot_core.backends.llm import llm_backends
from callbot_core.backends.vectors import get_vector_store

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    store: str


class BackendHealth(BaseModel):
    name: str
    ok: bool
    where: str
    detail: str


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(ctx: Context) -> Health | JSONResponse:
    """Whether the API answers and its store does; never needs a credential, never says more than that."""

    def _store_ok() -> bool:
        try:
            with ctx.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # any failure is "down"; the detail goes to the store's own log, not to anonymous callers
            return False

    if await run_in_threadpool(_store_ok):
        return Health(status="ok", store="ok")
    return JSONResponse({"status": "degraded", "store": "unreachable"}, status_code=503)


@router.get("/v1/health/backends", response_model=list[BackendHealth], responses=ERROR_RESPONSES)
async def backends_health(ctx: Context, actor: CurrentActor) -> list[BackendHealth]:
    """Each LLM backend's health as it answers now, then the vector store's (a backend that is down says so; it is
    not an error)."""

    def _check() -> list[BackendHealth]:
        out = []
        for name in llm_backends.names():
            try:
                h = ctx.service.backend(name).health()
                out.append(BackendHealth(name=name, ok=h.ok, where=h.where, detail=h.detail))
            except Exception as exc:  # a backend that cannot even be built is unhealthy, with its reason
                out.append(BackendHealth(name=name, ok=False, where="", detail=str(exc).splitlines()[0][:300]))
        out.append(_vector_store_health())
        return out

    def _vector_store_health() -> BackendHealth:
        # The knowledge collections' vector store: the configured one (embedded Chroma, or a Chroma server).
        name = f"vectors.{ctx.settings.vector_store}"
        try:
            store = get_vector_store(settings=ctx.settings)
            store.health()
            return BackendHealth(name=name, ok=True, where=store.where, detail="answers")
        except Exception as exc:
            return BackendHealth(name=name, ok=False, where="", detail=str(exc).splitlines()[0][:300])

    return await run_in_threadpool(_check)
