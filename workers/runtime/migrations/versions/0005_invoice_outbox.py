"""invoices remember whether their invoice.finalized event was published

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 11:05:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('invoices') as batch:
        batch.add_column(sa.Column('published_at', sa.DateTime(), nullable=True))
        batch.create_index(batch.f('ix_invoices_published_at'), ['published_at'])
    # Invoices from before were published by the close that inserted them.
    op.execute("UPDATE invoices SET published_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table('invoices') as batch:
        batch.drop_index(batch.f('ix_invoices_published_at'))
        batch.drop_column('published_at')
