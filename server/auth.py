"""Admin routes (weights, groups, pause/continue, flush, abort-all) need
`Authorization: Bearer <token>` when the server has a token. Without a token the server
refuses to bind a non-loopback address unless told otherwise (see ServerConfig)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute

from server.config import ServerConfig
from server.errors import ApiError


def _authorized(config: ServerConfig, authorization: str) -> bool:
    if config.admin_token is None:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), config.admin_token.encode()
    )


def _unauthorized() -> ApiError:
    return ApiError(401, "this admin route needs 'Authorization: Bearer <admin token>'",
                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def check_admin(config: ServerConfig, request: Request) -> None:
    if not _authorized(config, request.headers.get("authorization", "")):
        raise _unauthorized()


def admin_dependency(config: ServerConfig):
    """FastAPI dependency enforcing `check_admin`."""

    async def require_admin(request: Request) -> None:
        check_admin(config, request)

    require_admin.bebop_admin = True  # type: ignore[attr-defined]  # found by admin_paths
    return require_admin


def admin_paths(routers: Iterable[APIRouter]) -> set[str]:
    """Paths of the routes that carry `admin_dependency` (router-wide or their own)."""
    return {r.path for router in routers for r in router.routes if isinstance(r, APIRoute)
            and any(getattr(d.dependency, "bebop_admin", False) for d in r.dependencies)}  # fmt: skip


class AdminGateMiddleware:
    """Refuse admin paths without the token before the body is read or parsed: FastAPI
    decodes a JSON body before it runs route dependencies, so without this gate an
    unauthenticated caller got 400 for malformed JSON (and the server parsed up to
    --max-body-mb of it) instead of 401."""

    def __init__(self, app: Any, config: ServerConfig, paths: set[str]) -> None:
        self.app, self.config, self.paths = app, config, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths:
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not _authorized(self.config, authorization):
                await _unauthorized().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
