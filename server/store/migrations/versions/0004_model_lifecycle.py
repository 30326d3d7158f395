"""Model lifecycle: who made each version, rollbacks, tags, performance history, alerts, A/B tests.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("created_by", sa.String(128), nullable=False, server_default=""))
        batch.add_column(sa.Column("rollback_of", sa.Integer(), nullable=True))
    # Versions made before this migration: a round's are the federation's, the rest the server's.
    op.execute("UPDATE model_versions SET created_by = 'federation' WHERE round_id IS NOT NULL")
    op.execute("UPDATE model_versions SET created_by = 'server' WHERE round_id IS NULL")

    op.create_table(
        "model_tags",
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "performance_metrics",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("round_number", sa.Integer(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_performance_metrics_series",
        "performance_metrics",
        ["model_id", "metric", "recorded_at"],
    )
    op.create_table(
        "performance_alerts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("baseline", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_performance_alerts_model_id", "performance_alerts", ["model_id"])
    op.create_table(
        "ab_tests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("model_a", sa.String(256), nullable=False),
        sa.Column("model_b", sa.String(256), nullable=False),
        sa.Column("model_a_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("version_a", sa.Integer(), nullable=False),
        sa.Column("model_b_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("version_b", sa.Integer(), nullable=False),
        sa.Column("traffic_split", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("winner", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "ab_results",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("test_id", sa.Integer(), sa.ForeignKey("ab_tests.id"), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ab_results_arm", "ab_results", ["test_id", "metric", "variant"])


def downgrade() -> None:
    op.drop_index("ix_ab_results_arm", table_name="ab_results")
    op.drop_table("ab_results")
    op.drop_table("ab_tests")
    op.drop_index("ix_performance_alerts_model_id", table_name="performance_alerts")
    op.drop_table("performance_alerts")
    op.drop_index("ix_performance_metrics_series", table_name="performance_metrics")
    op.drop_table("performance_metrics")
    op.drop_table("model_tags")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("rollback_of")
        batch.drop_column("created_by")
