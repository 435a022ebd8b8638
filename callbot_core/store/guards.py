"""Rules the store keeps whoever writes through the ORM.

A persona version that has been used in a conversation is a fact about past transcripts: editing it
would silently rewrite what those conversations were run with. Edits must make a new version.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, exists, inspect, select
from sqlalchemy.orm import Session

from callbot_core.errors import Conflict
from callbot_core.store.models import Conversation, PersonaVersion


@event.listens_for(Session, "before_flush")
def _refuse_edits_to_used_versions(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in session.dirty:
        if not isinstance(obj, PersonaVersion) or not session.is_modified(obj, include_collections=False):
            continue
        state = inspect(obj)
        changed = [attr.key for attr in state.attrs if attr.history.has_changes()]
        if not changed or obj.id is None:
            continue
        with session.no_autoflush:
            used = session.execute(select(exists().where(Conversation.persona_version_id == obj.id))).scalar()
        if used:
            raise Conflict(
                f"Persona version {obj.id} (version {obj.version}) has been used in a conversation and "
                f"cannot change ({', '.join(sorted(changed))}); save the edit as a new version instead"
            )
