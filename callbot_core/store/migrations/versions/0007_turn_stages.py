"""turn stages: one row per stage of a turn (validate, prompt, generate, persist...) with its timing

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "turn_stages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("turn_metrics_id", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_output_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["turn_metrics_id"],
            ["turn_metrics.id"],
            name=op.f("fk_turn_stages_turn_metrics_id_turn_metrics"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turn_stages")),
        sa.UniqueConstraint("turn_metrics_id", "position", name="uq_turn_stages_turn_position"),
    )


def downgrade() -> None:
    op.drop_table("turn_stages")
