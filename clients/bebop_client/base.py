"""State, request building and reply parsing shared by the sync and async clients (no I/O
here: each call is a plan of bebop_client.calls that the client drives with its own I/O)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx

from bebop_client.calls import Plan, Send, retried
from bebop_client.errors import ProtocolError
from bebop_client.sample import Sample, generate_body, parse_sample, sample_params
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

    def _request_plan(self, method: str, path: str, url: str | None, timeout: float | None,
                      kwargs: dict[str, Any]) -> Plan[httpx.Response]:  # fmt: skip
        """One call with retries; `url=None` lets the pool choose the server."""
        attempts = Attempts(self.retry, self.pool, url, what=f"{method} {path}")
        headers = {**self.headers, **kwargs.pop("headers", {})}
        sent = {"headers": headers, "timeout": self._timeout(timeout), **kwargs}
        _, resp = yield from retried(attempts, lambda u: (Send(method, u + path, sent), _no_op))
        return resp

    def _generate_plan(self, body: dict[str, Any], prompt_ids: Sequence[int],
                       timeout: float | None) -> Plan[Sample]:  # fmt: skip
        """One sample's /generate with retries: a fresh rid after a try that may have been
        delivered, the rid tracked while in flight (for abort), orphaned tries aborted."""
        rid = body["rid"]
        attempts = Attempts(self.retry, self.pool, what=f"generate {rid}")

        def try_at(url: str) -> tuple[Send, Any]:
            sent = self._retry_rid(body, rid, attempts)
            self._track(sent, url)
            self.pool.begin(url)

            def done() -> None:
                self.pool.end(url)
                self._track(sent, None)

            kwargs = {"json": body, "headers": self.headers, "timeout": self._timeout(timeout)}
            return Send("POST", url + "/generate", kwargs, abort=self._abort_send(url, sent)), done

        url, resp = yield from retried(attempts, try_at)
        return parse_sample(json_of(resp, "/generate"), prompt_ids, rid, url)

    def _abort_send(self, url: str, rid: str) -> Send:
        """A best-effort /abort_request of `rid` on `url` (no retries, connect timeout)."""
        kwargs = {"json": {"rid": rid}, "headers": self.headers, "timeout": self.connect_timeout_s}
        return Send("POST", url + "/abort_request", kwargs, quiet=True)

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


def _no_op() -> None:
    pass


def num_aborted(replies: Iterable[Any]) -> int:
    """Requests the servers aborted, summed over their /abort_request replies."""
    return sum(int((r or {}).get("num_aborted", 0)) for r in replies)


def weight_version_of(reply: Any) -> str:
    return str(reply["weight_version"])
