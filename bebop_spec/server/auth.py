"""Two keys, both sent as `Authorization: Bearer <key>`:

* `--api-key` guards every route except /health* and /metrics (and CORS preflights), as
  SGLang's and vLLM's --api-key do: 401 without it.
* `--admin-token` guards the admin routes (weights, groups, pause/continue, flush,
  abort-all) and also opens every other route. Without an admin token, the API key
  guards the admin routes like every other route.

With neither, the server refuses to bind a non-loopback address unless told otherwise
(see ServerConfig)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute

from bebop_spec.server.config import ServerConfig
from bebop_spec.server.errors import ApiError

OPEN_PREFIXES = ("/health", "/metrics")  # never need the API key (probes, scrapers)


def _bearer_is(authorization: str, key: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _authorized(config: ServerConfig, authorization: str) -> bool:
    """May this caller use an admin route? (The API key, if any, is checked separately.)"""
    return config.admin_token is None or _bearer_is(authorization, config.admin_token)


def _unauthorized(
    what: str = "this admin route needs 'Authorization: Bearer <admin token>'",
) -> ApiError:
    return ApiError(401, what, headers={"WWW-Authenticate": "Bearer"})


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
    """Check the keys before the body is read or parsed: FastAPI decodes a JSON body before
    it runs route dependencies, so without this gate an unauthenticated caller got 400 for
    malformed JSON (and the server parsed up to --max-body-mb of it) instead of 401."""

    def __init__(self, app: Any, config: ServerConfig, paths: set[str]) -> None:
        self.app, self.config, self.paths = app, config, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> ApiError | None:
        path, cfg = scope.get("path", ""), self.config
        authorization = dict(scope.get("headers") or []).get(b"authorization", b"")
        authorization = authorization.decode("latin-1")
        if cfg.admin_token is not None and _bearer_is(authorization, cfg.admin_token):
            return None  # the admin token opens every route
        if path in self.paths and cfg.admin_token is not None:
            return _unauthorized()
        if cfg.api_key is None or scope.get("method") == "OPTIONS":
            return None
        if path.startswith(OPEN_PREFIXES) or _bearer_is(authorization, cfg.api_key):
            return None
        return _unauthorized("this server needs 'Authorization: Bearer <api key>'")
