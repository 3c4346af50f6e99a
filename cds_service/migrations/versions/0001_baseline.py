"""Baseline: the audit store's tables as they were before the schema was versioned.

Creates only what is missing, so a store made by an earlier release (same tables, no `alembic_version`) is
adopted as it is, with its rows.

Revision ID: 0001_baseline
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    existing = set(sa.inspect(op.get_bind()).get_table_names(schema=schema))
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    if "hook_calls" not in existing:
        op.create_table(
            "hook_calls",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("service_id", sa.Text, nullable=False),
            sa.Column("endpoint", sa.Text, nullable=False),
            sa.Column("hook", sa.Text),
            sa.Column("hook_instance", sa.Text),
            sa.Column("status_code", sa.Integer, nullable=False),
            sa.Column("latency_ms", sa.Float, nullable=False),
            sa.Column("outcome", sa.Text),
            sa.Column("decisions", json_type, nullable=False),
            sa.Column("cards", json_type, nullable=False),
            sa.Column("system_actions", json_type, nullable=False),
            sa.Column("mapping_version", sa.Text),
            sa.Column("issuer", sa.Text),
            sa.Column("patient_id", sa.Text),
            sa.Column("user_id", sa.Text),
            sa.Column("fhir_server", sa.Text),
            sa.Column("error", sa.Text),
            schema=schema,
        )
        op.create_index("ix_hook_calls_received_at", "hook_calls", ["received_at"], schema=schema)
        op.create_index("ix_hook_calls_hook_instance", "hook_calls", ["hook_instance"], schema=schema)
    if "feedback" not in existing:
        op.create_table(
            "feedback",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("service_id", sa.Text, nullable=False),
            sa.Column("card_uuid", sa.Text, nullable=False),
            sa.Column("outcome", sa.Text, nullable=False),
            sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
            sa.Column("accepted_suggestions", json_type, nullable=False),
            sa.Column("override_reason", json_type),
            sa.Column("user_comment", sa.Text),
            sa.Column("issuer", sa.Text),
            sa.UniqueConstraint("service_id", "card_uuid", "outcome", "outcome_timestamp", name="uq_feedback_item"),
            schema=schema,
        )
        op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"], schema=schema)
    if "jwt_ids" not in existing:
        op.create_table(
            "jwt_ids",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("issuer", sa.Text, nullable=False),
            sa.Column("jti", sa.Text, nullable=False),
            sa.Column("forget_after", sa.Float, nullable=False),
            sa.UniqueConstraint("issuer", "jti", name="uq_jwt_ids"),
            schema=schema,
        )
        op.create_index("ix_jwt_ids_forget_after", "jwt_ids", ["forget_after"], schema=schema)


def downgrade() -> None:
    raise NotImplementedError("the baseline is not downgraded: the audit trail is kept")
