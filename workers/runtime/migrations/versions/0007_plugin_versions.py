"""tenant_plugins, plugin_call_stats; plugin deployments (deployments.plugin, .targets)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployments') as batch:
        batch.alter_column('tenant_id', existing_type=sa.String(40), nullable=True)
        batch.add_column(sa.Column('plugin', sa.String(64), nullable=True))
        batch.add_column(sa.Column('targets', sa.JSON(), nullable=False, server_default='[]'))
        batch.create_index(batch.f('ix_deployments_plugin'), ['plugin'])
    op.create_table(
        'tenant_plugins',
        sa.Column('tenant_id', sa.String(40), nullable=False),
        sa.Column('plugin', sa.String(64), nullable=False),
        sa.Column('version', sa.String(64), nullable=True),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('previous_version', sa.String(64), nullable=True),
        sa.Column('deployment_id', sa.String(32), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ['tenant_id'], ['tenants.id'], name=op.f('fk_tenant_plugins_tenant_id_tenants')
        ),
        sa.PrimaryKeyConstraint('tenant_id', 'plugin', name=op.f('pk_tenant_plugins')),
    )
    op.create_index(op.f('ix_tenant_plugins_plugin'), 'tenant_plugins', ['plugin'])
    op.create_index(op.f('ix_tenant_plugins_deployment_id'), 'tenant_plugins', ['deployment_id'])
    op.create_table(
        'plugin_call_stats',
        sa.Column('plugin', sa.String(64), nullable=False),
        sa.Column('version', sa.String(64), nullable=False),
        sa.Column('tenant_id', sa.String(40), nullable=False),
        sa.Column('window_start', sa.DateTime(), nullable=False),
        sa.Column('calls', sa.Integer(), nullable=False),
        sa.Column('errors', sa.Integer(), nullable=False),
        sa.Column('latency_ms_sum', sa.Float(), nullable=False),
        sa.Column('latency_ms_sq', sa.Float(), nullable=False),
        sa.Column('latency_ms_max', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(
            'plugin', 'version', 'tenant_id', 'window_start', name=op.f('pk_plugin_call_stats')
        ),
    )
    op.create_index(op.f('ix_plugin_call_stats_window_start'), 'plugin_call_stats', ['window_start'])


def downgrade() -> None:
    op.drop_index(op.f('ix_plugin_call_stats_window_start'), table_name='plugin_call_stats')
    op.drop_table('plugin_call_stats')
    op.drop_index(op.f('ix_tenant_plugins_deployment_id'), table_name='tenant_plugins')
    op.drop_index(op.f('ix_tenant_plugins_plugin'), table_name='tenant_plugins')
    op.drop_table('tenant_plugins')
    with op.batch_alter_table('deployments') as batch:
        batch.drop_index(batch.f('ix_deployments_plugin'))
        batch.drop_column('targets')
        batch.drop_column('plugin')
        batch.alter_column('tenant_id', existing_type=sa.String(40), nullable=False)
