"""Plain ASGI middlewares, independent of framework versions.

BodyLimitMiddleware: a declared Content-Length over the limit is refused (413) before the
app runs; a body that grows past it while streaming gets a 413 and the app sees the client
as gone. FaultMiddleware: an unhandled exception becomes a logged 500 without crashing the
connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from bebop_spec.server.errors import ApiError

logger = logging.getLogger("bebop.server")


class BodyLimitMiddleware:
    def __init__(self, app: Any, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _reject(send, limit)
            return
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> dict:
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    state["over"] = True
                    if not state["started"]:
                        await _reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"]:
                return  # our 413 has been sent; drop whatever the app says
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise


async def _reject(send: Callable, limit: int) -> None:
    err = ApiError(413, f"request body exceeds the limit of {limit} bytes")
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FaultMiddleware:
    """A server fault answers a handled 500 `{"error": ...}` and is logged once. Starlette's
    own last-resort handler re-raises to uvicorn after replying, which logged an ASGI crash
    and reset the keep-alive connection, so the client's *next* request failed too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            logger.exception("unhandled error on %s", scope.get("path"))
            if not started:
                err = ApiError(500, f"internal error: {type(exc).__name__}")
                await err.response()(scope, receive, send)
