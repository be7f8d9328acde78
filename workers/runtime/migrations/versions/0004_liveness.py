"""step owners and heartbeats, the workers table

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:20:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('boot_id', sa.String(length=32), nullable=False),
    sa.Column('node', sa.String(length=200), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=200), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('beat_at', sa.DateTime(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(), nullable=True),
    sa.Column('lost_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('boot_id', name=op.f('pk_workers')),
    )
    op.create_index(op.f('ix_workers_node'), 'workers', ['node'])
    op.create_index(op.f('ix_workers_beat_at'), 'workers', ['beat_at'])
    with op.batch_alter_table('step_runs') as batch:
        batch.add_column(sa.Column('owner_id', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('history', sa.JSON(), nullable=True))
        batch.create_index(batch.f('ix_step_runs_owner_id'), ['owner_id'])


def downgrade() -> None:
    with op.batch_alter_table('step_runs') as batch:
        batch.drop_index(batch.f('ix_step_runs_owner_id'))
        batch.drop_column('history')
        batch.drop_column('heartbeat_at')
        batch.drop_column('owner_id')
    op.drop_index(op.f('ix_workers_beat_at'), table_name='workers')
    op.drop_index(op.f('ix_workers_node'), table_name='workers')
    op.drop_table('workers')
