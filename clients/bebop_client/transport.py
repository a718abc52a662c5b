"""Deciding, not doing, for HTTP calls: which server next, whether and how long to wait
before retrying, and which exception a failed reply becomes. The sync and async clients
run the same `Attempts` loop with their own I/O.

    attempts = Attempts(policy, pool)
    while True:
        url = attempts.next_url()
        try: resp = send(url)
        except httpx.HTTPError as exc: sleep(attempts.failed(url, exc)); continue
        delay = attempts.answered(url, resp)
        if delay is None: return resp
        sleep(delay)
"""

from __future__ import annotations

import email.utils
import itertools
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import httpx

from bebop_client.errors import (
    AuthenticationError,
    RequestRejected,
    RequestTimeout,
    ServerError,
    ServerOverloaded,
    ServerUnreachable,
)

CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # request never reached a server
DROPPED_ERRORS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)  # may have
# A try that failed this way may have left its request running on the server (abort it).
MAYBE_RUNNING = (httpx.ReadTimeout, httpx.WriteTimeout, *DROPPED_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: wait initial·multiplier^(k-1) (capped, ± jitter) before retry k;
    a 503/429 carrying Retry-After waits what the server asked (capped)."""

    max_attempts: int = 6
    initial_backoff_s: float = 0.25
    multiplier: float = 2.0
    max_backoff_s: float = 20.0
    jitter: float = 0.2  # fraction of the wait, drawn uniformly in [-jitter, +jitter]
    max_retry_after_s: float = 120.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 502, 503, 504}))
    retry_on_timeout: bool = False  # a long generation is not a dead server
    down_for_s: float = 2.0  # a server that refused a connection is avoided this long

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("need max_attempts >= 1, initial_backoff_s >= 0, multiplier >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        if retry_after is not None:
            base = min(retry_after, self.max_retry_after_s)
        else:
            base = min(self.initial_backoff_s * self.multiplier ** (retry - 1), self.max_backoff_s)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent/unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class EndpointPool:
    """Server URLs with simple load spreading: "least_outstanding" (fewest requests in
    flight, ties in rotation) or "round_robin". Servers that refused a connection are
    skipped for a while. Thread-safe (the sync client's workers share it)."""

    STRATEGIES = ("least_outstanding", "round_robin")

    def __init__(self, urls: str | Sequence[str], strategy: str = "least_outstanding") -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("at least one server URL is needed")
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES}, got {strategy!r}")
        self.urls = [normalize_url(u) for u in urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"duplicate server URLs: {self.urls}")
        self.strategy = strategy
        self.outstanding = dict.fromkeys(self.urls, 0)
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self, avoid: Iterable[str] = ()) -> str:
        avoid = set(avoid)
        now = time.monotonic()
        with self._lock:
            up = [u for u in self.urls if self._down_until[u] <= now]
            candidates = [u for u in up if u not in avoid] or up or self.urls
            start = next(self._turn) % len(candidates)
            rotated = candidates[start:] + candidates[:start]
            if self.strategy == "round_robin":
                return rotated[0]
            return min(rotated, key=lambda u: self.outstanding[u])

    def begin(self, url: str) -> None:
        with self._lock:
            self.outstanding[url] += 1

    def end(self, url: str) -> None:
        with self._lock:
            self.outstanding[url] -= 1

    def mark_down(self, url: str, seconds: float) -> None:
        with self._lock:
            self._down_until[url] = time.monotonic() + seconds


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url


def error_message(resp: httpx.Response) -> tuple[str, str | None, object, object]:
    """(message, param, code, body) of a failed reply: the OpenAI `error` object first,
    then SGLang's `message`, FastAPI's `detail`, or the raw text."""
    try:
        body = resp.json()
    except ValueError:
        return (resp.text.strip() or resp.reason_phrase), None, None, resp.text
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), err.get("param"), err.get("code"), body
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key]), None, None, body
    return str(body), None, None, body


def rejection(resp: httpx.Response, url: str, cls: type[RequestRejected] | None = None):
    """The exception for a reply the client will not retry."""
    message, param, code, body = error_message(resp)
    if cls is None:
        cls = (
            AuthenticationError
            if resp.status_code in (401, 403)
            else ServerError
            if resp.status_code >= 500
            else RequestRejected
        )
    return cls(resp.status_code, message, url=url, param=param, code=code, body=body)


class Attempts:
    """One logical call's retry state. `next_url()` before each try; then `failed(exc)` or
    `answered(resp)` say how long to wait before the next try, or raise."""

    def __init__(self, policy: RetryPolicy, pool: EndpointPool, url: str | None = None,
                 what: str = "request") -> None:  # fmt: skip
        self.policy, self.pool, self.fixed, self.what = policy, pool, url, what
        self.attempt = 0
        self.maybe_delivered = False  # an earlier try may have reached the server
        self._tried: list[str] = []
        self._last_status: int | None = None
        self._last_error: str = ""

    def next_url(self) -> str:
        self.attempt += 1
        url = self.fixed or self.pool.pick(avoid=self._tried[-1:])
        self._tried.append(url)
        return url

    def _retry(self, delay: float) -> float:
        if self.attempt >= self.policy.max_attempts:
            raise self._exhausted()
        return delay

    def failed(self, url: str, exc: Exception) -> float:
        """A transport error on `url`: seconds to wait, or the exception to raise."""
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            if not self.policy.retry_on_timeout:
                raise RequestTimeout(
                    f"{self.what} to {url} timed out ({type(exc).__name__})"
                ) from exc
            self.maybe_delivered = True
        elif isinstance(exc, CONNECT_ERRORS):
            self.pool.mark_down(url, self.policy.down_for_s)
        elif isinstance(exc, DROPPED_ERRORS):
            self.maybe_delivered = True
            self.pool.mark_down(url, self.policy.down_for_s)
        else:
            raise exc
        self._last_status, self._last_error = None, f"{type(exc).__name__}: {exc}"
        try:
            return self._retry(self.policy.backoff(self.attempt))
        except ServerUnreachable as err:
            raise err from exc

    def answered(self, url: str, resp: httpx.Response) -> float | None:
        """None when `resp` is the answer; seconds to wait before retrying; or raises."""
        if resp.status_code < 400:
            return None
        if resp.status_code not in self.policy.retry_statuses:
            raise rejection(resp, url)
        self._last_status = resp.status_code
        self._last_error = error_message(resp)[0]
        retry_after = parse_retry_after(resp.headers.get("retry-after"))
        return self._retry(self.policy.backoff(self.attempt, retry_after))

    def _exhausted(self) -> Exception:
        n, urls = self.attempt, sorted(set(self._tried))
        if self._last_status is not None:
            return ServerOverloaded(
                f"{self.what}: HTTP {self._last_status} after {n} attempts ({self._last_error})",
                self._last_status,
                n,
            )
        return ServerUnreachable(
            f"{self.what}: no server reachable after {n} attempts on {urls} ({self._last_error})",
            urls,
            n,
        )
