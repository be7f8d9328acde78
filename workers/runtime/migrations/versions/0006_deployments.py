"""deployments, approvals; tenants' environment and release; instances' release

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 17:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        batch.add_column(
            sa.Column('environment', sa.String(32), nullable=False, server_default='development')
        )
        batch.add_column(sa.Column('release', sa.JSON(), nullable=False, server_default='{}'))
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('release', sa.String(64), nullable=True))
    op.create_table(
        'deployments',
        sa.Column('id', sa.String(32), nullable=False),
        sa.Column('tenant_id', sa.String(40), nullable=False),
        sa.Column('status', sa.String(32), nullable=False),
        sa.Column('strategy', sa.String(64), nullable=False),
        sa.Column('strategy_config', sa.JSON(), nullable=False),
        sa.Column('environment', sa.String(32), nullable=False),
        sa.Column('release', sa.JSON(), nullable=False),
        sa.Column('previous_release', sa.JSON(), nullable=False),
        sa.Column('stages', sa.JSON(), nullable=False),
        sa.Column('stage_index', sa.Integer(), nullable=False),
        sa.Column('stage_state', sa.JSON(), nullable=False),
        sa.Column('measurements', sa.JSON(), nullable=False),
        sa.Column('timeline', sa.JSON(), nullable=False),
        sa.Column('approvals_required', sa.Integer(), nullable=False),
        sa.Column('approval_expires_at', sa.DateTime(), nullable=True),
        sa.Column('workflow_id', sa.String(32), nullable=True),
        sa.Column('requests', sa.JSON(), nullable=False),
        sa.Column('reason', sa.JSON(), nullable=True),
        sa.Column('actor', sa.String(200), nullable=False),
        sa.Column('rollback_of', sa.String(32), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ['tenant_id'], ['tenants.id'], name=op.f('fk_deployments_tenant_id_tenants')
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_deployments')),
    )
    op.create_index(op.f('ix_deployments_tenant_id'), 'deployments', ['tenant_id'])
    op.create_index(op.f('ix_deployments_status'), 'deployments', ['status'])
    op.create_table(
        'approvals',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('deployment_id', sa.String(32), nullable=False),
        sa.Column('actor', sa.String(200), nullable=False),
        sa.Column('decision', sa.String(16), nullable=False),
        sa.Column('comment', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ['deployment_id'], ['deployments.id'],
            name=op.f('fk_approvals_deployment_id_deployments'),
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_approvals')),
        sa.UniqueConstraint('deployment_id', 'actor', name=op.f('uq_approvals_deployment_id')),
    )
    op.create_index(op.f('ix_approvals_deployment_id'), 'approvals', ['deployment_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_approvals_deployment_id'), table_name='approvals')
    op.drop_table('approvals')
    op.drop_index(op.f('ix_deployments_status'), table_name='deployments')
    op.drop_index(op.f('ix_deployments_tenant_id'), table_name='deployments')
    op.drop_table('deployments')
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('release')
    with op.batch_alter_table('tenants') as batch:
        batch.drop_column('release')
        batch.drop_column('environment')
