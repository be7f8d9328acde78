"""usage, plan periods, invoices, autoscale decisions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 19:50:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('plan_periods',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('plan', sa.String(length=64), nullable=False),
    sa.Column('start_at', sa.DateTime(), nullable=False),
    sa.Column('end_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plan_periods')),
    sa.UniqueConstraint('tenant_id', 'start_at', name=op.f('uq_plan_periods_tenant_id')),
    )
    op.create_index(op.f('ix_plan_periods_tenant_id'), 'plan_periods', ['tenant_id'])
    op.create_table('meter_readings',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('source', sa.String(length=100), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('taken_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'source', 'metric', name=op.f('pk_meter_readings')),
    )
    op.create_table('usage_records',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('window_start', sa.DateTime(), nullable=False),
    sa.Column('window_end', sa.DateTime(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('aggregation', sa.String(length=8), nullable=False),
    sa.Column('recorded_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_records')),
    sa.UniqueConstraint('tenant_id', 'metric', 'window_start', name=op.f('uq_usage_records_tenant_id')),
    )
    op.create_index('ix_usage_records_window_start', 'usage_records', ['window_start'])
    op.create_table('invoices',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('period_start', sa.DateTime(), nullable=False),
    sa.Column('period_end', sa.DateTime(), nullable=False),
    sa.Column('currency', sa.String(length=8), nullable=False),
    sa.Column('total', sa.Numeric(precision=14, scale=4), nullable=False),
    sa.Column('lines', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invoices')),
    sa.UniqueConstraint('tenant_id', 'period_start', name=op.f('uq_invoices_tenant_id')),
    )
    op.create_index(op.f('ix_invoices_tenant_id'), 'invoices', ['tenant_id'])
    op.create_table('autoscale_decisions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('rule', sa.String(length=64), nullable=False),
    sa.Column('window_start', sa.DateTime(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('inputs', sa.JSON(), nullable=False),
    sa.Column('workflow_id', sa.String(length=32), nullable=True),
    sa.Column('decided_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_autoscale_decisions')),
    sa.UniqueConstraint('tenant_id', 'rule', 'window_start', name=op.f('uq_autoscale_decisions_tenant_id')),
    )
    op.create_index(op.f('ix_autoscale_decisions_tenant_id'), 'autoscale_decisions', ['tenant_id'])


def downgrade() -> None:
    op.drop_table('autoscale_decisions')
    op.drop_table('invoices')
    op.drop_index('ix_usage_records_window_start', 'usage_records')
    op.drop_table('usage_records')
    op.drop_table('meter_readings')
    op.drop_table('plan_periods')
