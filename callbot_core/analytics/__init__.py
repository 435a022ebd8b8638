"""Analytics: DuckDB over the store (a snapshot kept in step), guarded user SQL, views and dashboards.

See `engine.py` for how the snapshot is kept and shared between processes, `guard.py` for what user SQL
may do, `views.py` for the documented views and `dashboard.py` for the dashboards' query set.
"""

from .dashboard import DASHBOARD_QUERIES, DashboardFilters, dashboard_data
from .engine import Analytics, QueryResult, QueryTimeout, RefreshStats
from .guard import ForbiddenSQL, check_sql
from .views import VIEW_DOCS, ViewDoc

__all__ = [
    "DASHBOARD_QUERIES",
    "VIEW_DOCS",
    "Analytics",
    "DashboardFilters",
    "ForbiddenSQL",
    "QueryResult",
    "QueryTimeout",
    "RefreshStats",
    "ViewDoc",
    "check_sql",
    "dashboard_data",
]
