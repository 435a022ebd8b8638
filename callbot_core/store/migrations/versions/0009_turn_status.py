"""turn status: running_turns marks a turn whose caller's message is stored and whose end is not yet

The caller's message is stored when a turn starts, with a running_turns row naming the process ("host:pid")
that runs it; the row goes when the turn's end (reply, turn_metrics, turn_stages) is written. A turn left
running by a process that died is reconciled as interrupted. turn_metrics itself is unchanged: its rows are
still written once, when the turn ends.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "running_turns",
        sa.Column("user_message_id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("worker", sa.String(length=160), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_running_turns_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_message_id"],
            ["messages.id"],
            name=op.f("fk_running_turns_user_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_message_id", name=op.f("pk_running_turns")),
    )
    with op.batch_alter_table("running_turns", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_running_turns_conversation_id"), ["conversation_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("running_turns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_running_turns_conversation_id"))
    op.drop_table("running_turns")
