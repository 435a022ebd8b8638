"""The SQL store: models, the engine, migrations and the guards that keep rows consistent."""

from callbot_core.store.db import Store, open_store

__all__ = ["Store", "open_store"]
