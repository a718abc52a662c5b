"""Sampling from running servers over HTTP, for `bebop mtp data --server` (remote_data.py).

    api = SERVER_APIS["openai"]()                        # or "sglang"
    async with ServerPool(urls, RetryPolicy(max_retries=5), concurrency=16) as pool:
        url, completions = await pool.request("POST", api.path,
                                              body=lambda url: api.body(req, model_of[url]),
                                              parse=lambda reply: api.parse(reply, req.n))

Two dialects: OpenAI `/v1/completions` with token-id prompts and `return_token_ids` (vLLM,
SGLang and Bebop's server answer with each choice's `token_ids`), and SGLang's native
`/generate` with `input_ids` (answers `output_ids`). A call goes to the least busy server,
and is retried with exponential backoff — on another server when there are several — after a
connection error, HTTP 429 or 5xx, or an aborted sample; any other 4xx fails at once.
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from bebop_spec.errors import BebopError

T = TypeVar("T")


class RemoteError(BebopError):
    """A server refused a request (`status`), or kept failing after every retry."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """A reply that is worth asking again for (an aborted sample)."""


@dataclass(frozen=True)
class SampleRequest:
    """n samples of one prompt, seeded (the server derives each sample's seed from `seed`)."""

    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # the response, its final EOS included when it stopped on one
    finish_reason: str  # "stop" | "length" (aborted samples are retried, never returned)


# ---------------------------------------------------------------- dialects


class ServerApi(ABC):
    """How one request for n samples is spelled and how its reply is read."""

    name: str
    path: str

    @abstractmethod
    def body(self, req: SampleRequest, model: str | None) -> dict[str, Any]: ...

    @abstractmethod
    def parse(self, reply: Any, n: int) -> list[Completion]: ...


class OpenAICompletions(ServerApi):
    name, path = "openai", "/v1/completions"

    def body(self, req: SampleRequest, model: str | None) -> dict[str, Any]:
        return {"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens,
                "n": req.n, "seed": req.seed, "temperature": req.temperature, "top_p": req.top_p,
                "return_token_ids": True}  # fmt: skip

    def parse(self, reply: Any, n: int) -> list[Completion]:
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise RemoteError(f"asked for {n} choices, the server answered {len(choices)}")
        if any(c.get("token_ids") is None for c in choices):
            raise RemoteError("the server's choices carry no token_ids: it does not support "
                              "return_token_ids (an older vLLM?); try --server-api sglang")  # fmt: skip
        return [_completion(c["token_ids"], c.get("finish_reason")) for c in choices]


class SGLangGenerate(ServerApi):
    name, path = "sglang", "/generate"

    def body(self, req: SampleRequest, model: str | None) -> dict[str, Any]:
        params = {"max_new_tokens": req.max_tokens, "n": req.n, "sampling_seed": req.seed,
                  "temperature": req.temperature, "top_p": req.top_p}  # fmt: skip
        return {"input_ids": req.prompt_ids, "sampling_params": params}

    def parse(self, reply: Any, n: int) -> list[Completion]:
        outs = reply if isinstance(reply, list) else [reply]
        if len(outs) != n:
            raise RemoteError(f"asked for {n} samples, the server answered {len(outs)}")
        res = []
        for out in outs:
            finish = out.get("meta_info", {}).get("finish_reason") or {}
            ids = list(out["output_ids"])
            matched = finish.get("matched")
            # a stop on a token id (EOS or stop_token_ids) keeps that token, as the engine does
            if isinstance(matched, int) and (not ids or ids[-1] != matched):
                ids.append(matched)
            res.append(_completion(ids, finish.get("type")))
        return res


def _completion(ids: list[int], finish: str | None) -> Completion:
    if finish not in ("stop", "length"):
        raise _Retryable(f"sample finished with {finish!r}")
    return Completion([int(t) for t in ids], finish)


SERVER_APIS: dict[str, type[ServerApi]] = {"openai": OpenAICompletions, "sglang": SGLangGenerate}


# ---------------------------------------------------------------- transport


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5  # attempts after the first
    backoff_s: float = 0.5  # first wait; doubled each retry
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"RetryPolicy fields must be >= 0, got {self}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based); a server's Retry-After
        lengthens it, max_backoff_s caps it."""
        return min(self.max_backoff_s, max(self.backoff_s * 2**attempt, retry_after or 0.0))


def retryable(status: int) -> bool:
    """Overload (429) and server-side failures (5xx) pass; other 4xx are the request's fault."""
    return status == 429 or status >= 500


class ServerPool:
    """One HTTP client over several servers: least-in-flight choice, retries, a clear error."""

    def __init__(self, urls: list[str] | tuple[str, ...], retry: RetryPolicy, concurrency: int,
                 timeout_s: float = 600.0, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self.urls = [u.rstrip("/") for u in urls]
        self.retry = retry
        self.in_flight = dict.fromkeys(self.urls, 0)
        self._turn = itertools.count()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=concurrency + len(self.urls)),
            headers=headers, transport=transport,
        )  # fmt: skip

    async def __aenter__(self) -> ServerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    def pick(self, avoid: str | None = None) -> str:
        """The server with the fewest requests in flight (ties in turn), not `avoid` if any
        other is left."""
        choices = [u for u in self.urls if u != avoid] or self.urls
        start = next(self._turn)
        order = [choices[(start + k) % len(choices)] for k in range(len(choices))]
        return min(order, key=lambda u: self.in_flight[u])

    async def request(self, method: str, path: str, *, body: Callable[[str], Any] | None = None,
                      parse: Callable[[Any], T] = lambda r: r,
                      url: str | None = None) -> tuple[str, T]:  # fmt: skip
        """(server, parse(JSON reply)) of `method path` on `url` or the least busy server;
        body(server) is the JSON body. RemoteError on a 4xx or once retries run out."""
        last, server = "", None
        for attempt in range(self.retry.max_retries + 1):
            server = url or self.pick(avoid=server)
            wait = None
            self.in_flight[server] += 1
            try:
                r = await self.client.request(
                    method, server + path, json=None if body is None else body(server)
                )
                if r.status_code < 400:
                    return server, parse(_json(r))
                if not retryable(r.status_code):
                    raise RemoteError(f"{method} {server}{path}: HTTP {r.status_code}: "
                                      f"{_message(r)}", r.status_code)  # fmt: skip
                last, wait = f"HTTP {r.status_code}: {_message(r)}", _retry_after(r)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except _Retryable as e:
                last = str(e)
            finally:
                self.in_flight[server] -= 1
            if attempt < self.retry.max_retries:
                await asyncio.sleep(self.retry.delay(attempt, wait))
        raise RemoteError(f"{method} {path} failed {self.retry.max_retries + 1} times "
                          f"(last, on {server}: {last})")  # fmt: skip


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError as e:
        raise RemoteError(f"{r.request.url}: the reply is not JSON ({e})") from None


def _message(r: httpx.Response) -> str:
    """The error's message (OpenAI's {error: {message}}, FastAPI's {detail}) or the body."""
    try:
        d = r.json()
    except ValueError:
        return r.text[:200].strip() or r.reason_phrase
    if isinstance(d, dict):
        err = d.get("error")
        msg = err.get("message") if isinstance(err, dict) else err or d.get("detail")
        if msg:
            return str(msg)
    return str(d)[:200]


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return float(r.headers.get("retry-after", ""))
    except ValueError:
        return None


__all__ = ["SERVER_APIS", "Completion", "RemoteError", "RetryPolicy", "SampleRequest",
           "ServerApi", "ServerPool", "retryable"]  # fmt: skip
