"""Analytics: DuckDB over the store (a snapshot kept in step), guarded user SQL, views and dashboards.

See `engine.py` for how the snapshot is kept and shared between processes, `guard.py` for what user SQL
may do, `views.py` for the documented views, `dashboard.py` for the dashboards' query set and
`leaderboard.py` for the Leaderboard page's tables.
"""

from callbot_core.analytics.dashboard import DASHBOARD_QUERIES, DashboardFilters, dashboard_data
from callbot_core.analytics.engine import Analytics, QueryResult, QueryTimeout, RefreshStats, ResultTooLarge
from callbot_core.analytics.guard import ForbiddenSQL, check_sql
from callbot_core.analytics.views import VIEW_DOCS, ViewDoc

__all__ = [
    "DASHBOARD_QUERIES",
    "VIEW_DOCS",
    "Analytics",
    "DashboardFilters",
    "ForbiddenSQL",
    "QueryResult",
    "QueryTimeout",
    "RefreshStats",
    "ResultTooLarge",
    "ViewDoc",
    "check_sql",
    "dashboard_data",
]
