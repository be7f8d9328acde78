"""``cul8er api serve | token``: serve the HTTP API with uvicorn, and issue operators' tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workers.cli.console import console, fail
from workers.runtime.settings import get_settings

__all__ = ["api_cli"]

api_cli = typer.Typer(help="The HTTP API (/api/v1): serve it, issue tokens.", no_args_is_help=True)


@api_cli.command("serve")
def api_serve(
    host: Annotated[str | None, typer.Option(help="Listen address (CUL8ER_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (CUL8ER_API_PORT).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve /api/v1 with uvicorn (TLS when given a certificate and key)."""
    import uvicorn

    settings = get_settings()
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise fail("validation_error", "give both --ssl-certfile and --ssl-keyfile, or neither")
    uvicorn.run(
        "workers.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        # X-Forwarded-* only from these proxies (uvicorn's own check).
        proxy_headers=True,
        forwarded_allow_ips=settings.api_forwarded_allow_ips,
        log_config=None,
        access_log=False,  # the API logs each request itself, without tokens
    )


@api_cli.command("token")
def api_token(
    sub: Annotated[str, typer.Option(help="The subject: who the token speaks for.")],
    role: Annotated[str, typer.Option(help="admin, operator, approver, tenant_owner, …")],
    tenant: Annotated[
        list[str] | None, typer.Option(help="A tenant a tenant_owner owns (repeatable).")
    ] = None,
    ttl: Annotated[int, typer.Option(help="Seconds the token is valid.")] = 3600,
) -> None:
    """Issue a bearer token signed with the configured key (printed, nothing else)."""
    from workers.api.auth import issue_token
    from workers.api.roles import Role

    try:
        chosen = Role(role)
    except ValueError:
        raise fail(
            "validation_error", f"unknown role {role!r}; roles: {', '.join(r.value for r in Role)}"
        ) from None
    token = issue_token(
        get_settings(), subject=sub, role=chosen, tenants=tenant or (), ttl_seconds=ttl
    )
    console.print(token, markup=False, highlight=False, soft_wrap=True)
