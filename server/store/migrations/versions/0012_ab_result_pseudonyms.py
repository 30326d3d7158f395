"""A/B results name their device by a keyed pseudonym (`device_ref`), not its id.

The column is renamed and widened (`KEYID:` + 64 hex). Rows written before keep
the device id in the clear until the next `xeno-fl admin rotate-key`, which
replaces it with the pseudonym; Forget finds both.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ab_results") as batch:
        batch.alter_column(
            "device_id",
            new_column_name="device_ref",
            existing_type=sa.String(64),
            type_=sa.String(96),
            existing_nullable=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("ab_results") as batch:
        batch.alter_column(
            "device_ref",
            new_column_name="device_id",
            existing_type=sa.String(96),
            type_=sa.String(64),
            existing_nullable=False,
        )
