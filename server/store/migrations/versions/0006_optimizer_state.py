"""Server optimizer state (FedAdam/FedYogi/FedAdagrad moments, FedAvgM momentum) per version.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("optimizer_state_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("optimizer_state", sa.JSON(), nullable=True))
        batch.create_foreign_key(
            "fk_model_versions_optimizer_state_blob",
            "blobs",
            ["optimizer_state_sha256"],
            ["sha256"],
        )


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint("fk_model_versions_optimizer_state_blob", type_="foreignkey")
        batch.drop_column("optimizer_state")
        batch.drop_column("optimizer_state_sha256")
