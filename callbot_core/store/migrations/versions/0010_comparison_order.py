"""comparison order: comparison_variants.setup_position, the order the variants were set up in

A blind comparison shuffles its variants once, when it starts: `position` (the column, label A first) then no
longer follows the order they were given in, which `setup_position` keeps. Comparisons stored before this
revision were never shuffled, so their setup_position is their position.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("comparison_variants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("setup_position", sa.Integer(), nullable=True))
    op.execute("UPDATE comparison_variants SET setup_position = position")
    with op.batch_alter_table("comparison_variants", schema=None) as batch_op:
        batch_op.alter_column("setup_position", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_comparison_variants_setup_position", ["comparison_id", "setup_position"])


def downgrade() -> None:
    with op.batch_alter_table("comparison_variants", schema=None) as batch_op:
        batch_op.drop_constraint("uq_comparison_variants_setup_position", type_="unique")
        batch_op.drop_column("setup_position")
