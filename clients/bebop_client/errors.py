"""The client's exceptions. Everything raised on purpose is a `BebopClientError`."""

from __future__ import annotations

from typing import Any


class BebopClientError(Exception):
    """Base class of every error this package raises on purpose."""


class ServerUnreachable(BebopClientError):
    """No server answered (connection refused / reset / DNS) after every retry."""

    def __init__(self, message: str, urls: list[str], attempts: int) -> None:
        super().__init__(message)
        self.urls, self.attempts = urls, attempts


class ServerOverloaded(BebopClientError):
    """The servers kept answering 503 / 429 until the retries ran out."""

    def __init__(self, message: str, status: int, attempts: int) -> None:
        super().__init__(message)
        self.status, self.attempts = status, attempts


class RequestTimeout(BebopClientError):
    """No complete reply within the request's timeout (the request is aborted server-side)."""


class RequestRejected(BebopClientError):
    """The server refused the request (4xx, or a 5xx that is not worth retrying).

    `message` is the server's own: the OpenAI-style `error.message`, else SGLang's `message`."""

    def __init__(self, status: int, message: str, *, url: str = "", param: str | None = None,
                 code: Any = None, body: Any = None) -> None:  # fmt: skip
        super().__init__(f"HTTP {status} from {url or 'server'}: {message}")
        self.status, self.message, self.url = status, message, url
        self.param, self.code, self.body = param, code, body


class AuthenticationError(RequestRejected):
    """401 / 403: an admin route needs `Authorization: Bearer <token>` (pass `api_key`)."""


class ServerError(RequestRejected):
    """The server failed on its side (HTTP 500)."""


class WeightSyncError(RequestRejected):
    """A server refused a weight update (unknown names, shapes, dtypes...); nothing changed
    there. `message` names the offending tensors as the server reported them; `applied`
    holds the replies of servers that had already taken this update (several servers)."""

    def __init__(self, status: int, message: str, *, applied: dict | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(status, message, **kwargs)
        self.applied = applied or {}


class VersionConflict(BebopClientError):
    """The pushed weight_version is older than what a server already serves (integer labels);
    raised before anything is sent."""

    def __init__(self, message: str, pushed: str, serving: dict[str, str]) -> None:
        super().__init__(message)
        self.pushed, self.serving = pushed, serving


class ProtocolError(BebopClientError):
    """The server's reply does not have the expected shape."""
