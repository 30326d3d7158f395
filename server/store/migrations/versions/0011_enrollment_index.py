"""Each device's enrollment index, stored, so that Forget releases it for reuse.

Existing devices get the index they were handed (their order of registration).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("enrollment_index", sa.Integer(), nullable=True))
    devices = sa.table(
        "devices",
        sa.column("id", sa.String),
        sa.column("created_at", sa.DateTime),
        sa.column("enrollment_index", sa.Integer),
    )
    bind = op.get_bind()
    ids = bind.execute(sa.select(devices.c.id).order_by(devices.c.created_at, devices.c.id))
    for index, (device_id,) in enumerate(ids.all()):
        bind.execute(
            devices.update().where(devices.c.id == device_id).values(enrollment_index=index)
        )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("enrollment_index")
