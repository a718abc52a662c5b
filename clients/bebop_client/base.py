"""State and helpers shared by the sync and async clients (no I/O here)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from bebop_client.errors import ProtocolError
from bebop_client.sample import generate_body, sample_params
from bebop_client.transport import Attempts, EndpointPool, RetryPolicy

Params = Mapping[str, Any] | None


class ClientBase:
    """Servers, retry policy, auth header, timeouts, and which rid runs where."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        strategy: str = "least_outstanding",
        max_concurrency: int = 256,
        sampling_params: Params = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        self.pool = EndpointPool(urls, strategy)
        self.retry = retry or RetryPolicy()
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s, self.connect_timeout_s = timeout, connect_timeout
        self.max_concurrency = max_concurrency
        self.default_params = dict(sampling_params or {})
        self._inflight: dict[str, str] = {}  # rid sent -> server url
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return list(self.pool.urls)

    def _timeout(self, seconds: float | None) -> httpx.Timeout:
        return httpx.Timeout(seconds or self.timeout_s, connect=self.connect_timeout_s)

    @staticmethod
    def _group_rids(rid: str | None, n: int) -> list[str]:
        """rid of each sample of a group: `rid` itself for n == 1, else `rid-0 .. rid-{n-1}`
        (the server's /abort_request matches by prefix, so abort(rid) reaches them all)."""
        if n < 1:
            raise ValueError("n must be >= 1")
        base = rid or uuid.uuid4().hex
        return [base] if n == 1 else [f"{base}-{i}" for i in range(n)]

    def _bodies(self, prompt_ids: Sequence[int], params: Params, n: int, rid: str | None,
                return_logprob: bool) -> list[dict[str, Any]]:  # fmt: skip
        merged = {**self.default_params, **(params or {})}
        rids = self._group_rids(rid, n)
        return [generate_body(prompt_ids, sample_params(merged, i), r, return_logprob=return_logprob)
                for i, r in enumerate(rids)]  # fmt: skip

    @staticmethod
    def _retry_rid(body: dict[str, Any], original: str, attempts: Attempts) -> str:
        """A retry after a try that may have reached the server gets a fresh rid (the server
        refuses a rid still in flight); it still starts with the original, for abort()."""
        body["rid"] = (
            f"{original}-retry{attempts.attempt}" if attempts.maybe_delivered else original
        )
        return body["rid"]

    def _track(self, rid: str, url: str | None) -> None:
        with self._lock:
            if url is None:
                self._inflight.pop(rid, None)
            else:
                self._inflight[rid] = url

    def _servers_of(self, rid: str) -> list[str]:
        """Servers running `rid` or any request whose rid starts with it (all if none known)."""
        with self._lock:
            hits = {u for r, u in self._inflight.items() if r.startswith(rid)}
        return sorted(hits) or self.urls


def json_of(resp: httpx.Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError as exc:
        raise ProtocolError(f"{what}: reply is not JSON: {resp.text[:200]!r}") from exc
