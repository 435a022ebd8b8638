"""Read-only SQL over the store's analytics snapshot (`POST /v1/sql`): the SQL console's guard, limits and audit.

The engine (`analytics/engine.py`) does the work: `check_sql` refuses anything but one read-only query (recorded
as `sql.refused`), the query runs on a fresh snapshot in a worker process with a memory cap and a timeout, the
result is capped in rows (`limit`) and bytes, and every query is audited with who asked and from where.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from callbot_core.api.auth import Context, CurrentActor, client_addr
from callbot_core.api.context import ApiContext
from callbot_core.api.errors import ERROR_RESPONSES, ApiError, ErrorBody
from callbot_core.api.routes.conversations import PlainText

if TYPE_CHECKING:
    from callbot_core.analytics import Analytics

router = APIRouter(tags=["sql"], responses=ERROR_RESPONSES)

MAX_ROWS = 10_000  # the SQL console's own ceiling on rows shown
TIMEOUT_S = 30.0


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sql: PlainText = Field(description="One read-only query (DuckDB dialect) over the snapshot's tables and views",
                           examples=["select persona, count(*) as turns from turns group by 1"])  # fmt: skip
    limit: int = Field(1000, ge=0, le=MAX_ROWS, description="Rows returned at most; `truncated` says when more exist")


class SqlResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]] = Field(description="Timestamps as ISO text, decimals as numbers, bytes as hex")
    truncated: bool = Field(description="More rows matched than `limit`")
    elapsed_ms: float


def json_cell(value: Any) -> Any:
    """A DuckDB value as JSON carries it (lists and structs too): not-a-number and infinities become null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_cell(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_cell(v) for v in value]
    return str(value)


def _analytics(ctx: ApiContext) -> Analytics:
    """One handle per application (it holds no connection between calls), over the API's own store."""
    found = ctx.parts.get("analytics")
    if found is None:
        from callbot_core.analytics import Analytics
        from callbot_core.analytics.engine import SNAPSHOT_NAME

        found = ctx.parts["analytics"] = Analytics(ctx.store, ctx.settings.resolved_runtime_dir() / SNAPSHOT_NAME)
    return found


@router.post("/v1/sql", response_model=SqlResult, responses={
    504: {"model": ErrorBody, "description": f"The query ran longer than {TIMEOUT_S:g} s"},
})  # fmt: skip
async def run_sql(body: SqlRequest, request: Request, ctx: Context, actor: CurrentActor) -> SqlResult:
    """Run one read-only query over the analytics snapshot (refreshed from the store first). A statement that
    writes, reads files or runs several statements is refused (`sql_refused`); every query is audited."""
    from callbot_core.analytics import ForbiddenSQL, QueryTimeout

    addr = client_addr(request)

    def _query() -> SqlResult:
        an = _analytics(ctx)
        result = an.query(body.sql, max_rows=body.limit, timeout_s=TIMEOUT_S, actor=actor, client_addr=addr)
        rows = [[json_cell(v) for v in row] for row in result.rows]
        return SqlResult(columns=result.columns, rows=rows, truncated=result.truncated, elapsed_ms=result.elapsed_ms)

    try:
        return await run_in_threadpool(_query)
    except ForbiddenSQL as exc:
        raise ApiError(422, "sql_refused", str(exc)) from None
    except QueryTimeout as exc:
        raise ApiError(504, "query_timeout", str(exc)) from None
