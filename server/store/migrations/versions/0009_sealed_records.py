"""Encryption at rest, finished: version MACs, sealed participant rows, the data key's id.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("mac", sa.String(96), nullable=True))
    with op.batch_alter_table("round_participants") as batch:
        batch.add_column(sa.Column("sealed", sa.LargeBinary(), nullable=True))
    op.create_table(
        "data_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("rotating_to", sa.String(16), nullable=True),
        sa.Column("rows_done", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("data_keys")
    with op.batch_alter_table("round_participants") as batch:
        batch.drop_column("sealed")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("mac")
