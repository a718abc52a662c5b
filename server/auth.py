"""Admin routes (weights, groups, pause/continue, flush, abort-all) need
`Authorization: Bearer <token>` when the server has a token. Without a token the server
refuses to bind a non-loopback address unless told otherwise (see ServerConfig)."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.config import ServerConfig
from server.errors import ApiError


def check_admin(config: ServerConfig, request: Request) -> None:
    if config.admin_token is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), config.admin_token.encode()
    ):
        raise ApiError(401, "this admin route needs 'Authorization: Bearer <admin token>'",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def admin_dependency(config: ServerConfig):
    """FastAPI dependency enforcing `check_admin`."""

    async def require_admin(request: Request) -> None:
        check_admin(config, request)

    return require_admin
