"""System metrics snapshots (psutil) stored in `system_metrics`, so the dashboards can show the machine's load
beside the bots' latencies."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store
from callbot_core.store.models import SystemMetrics, utcnow

# cpu_percent needs two readings; a short interval keeps a scheduled job quick while still measuring
# real load (interval=None would compare against an unknown earlier call and return 0.0 the first time).
CPU_SAMPLE_S = 0.2

_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SystemMetricsInfo:
    id: int
    taken_at: datetime
    host: str
    cpu_percent: float
    memory_percent: float
    memory_used_mb: float
    disk_percent: float
    process_rss_mb: float


def _existing_parent(path: Path) -> Path:
    # The runtime folder may not exist yet on a fresh machine; its filesystem is that of its nearest parent.
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def snapshot(
    store: Store, *, settings: Settings | None = None, cpu_sample_s: float = CPU_SAMPLE_S
) -> SystemMetricsInfo:
    """Measure CPU, memory, the runtime folder's disk and this process's RSS, and store one row."""
    settings = settings or get_settings()
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing_parent(settings.resolved_runtime_dir())))
    row = SystemMetrics(
        taken_at=utcnow(),
        host=socket.gethostname(),
        cpu_percent=float(psutil.cpu_percent(interval=cpu_sample_s)),
        memory_percent=float(memory.percent),
        memory_used_mb=round((memory.total - memory.available) / _MB, 1),
        disk_percent=float(disk.percent),
        process_rss_mb=round(psutil.Process(os.getpid()).memory_info().rss / _MB, 1),
    )
    with store.session() as session:
        session.add(row)
        session.flush()
        return SystemMetricsInfo(
            id=row.id,
            taken_at=row.taken_at,
            host=row.host,
            cpu_percent=row.cpu_percent,
            memory_percent=row.memory_percent,
            memory_used_mb=row.memory_used_mb,
            disk_percent=row.disk_percent,
            process_rss_mb=row.process_rss_mb,
        )
