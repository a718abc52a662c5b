"""One retry loop for both clients, with the I/O left out.

A call is a *plan*: a generator that yields what to do next (`Send` a request, `Sleep`),
is sent each reply (or thrown the transport error) and returns the call's result.
`run` drives a plan with blocking httpx, `arun` with asyncio; the plans themselves (which
server, when to retry, fresh rids, aborts of orphaned requests) are written once, in
`retried` and `ClientBase`.

    plan = client._request_plan("GET", "/health", None, None, {})
    resp = run(plan, httpx.Client())          # or: await arun(plan, httpx.AsyncClient())
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import httpx

from bebop_client.transport import MAYBE_RUNNING, Attempts

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """One HTTP request: `http.request(method, url, **kwargs)`."""

    method: str
    url: str
    kwargs: dict[str, Any]
    quiet: bool = False  # best effort: a transport error answers None instead of failing
    abort: Send | None = None  # sent quietly if this try may have left the request running


@dataclass(frozen=True)
class Sleep:
    seconds: float


Action = Union[Send, Sleep]  # noqa: UP007 - a runtime alias (Python 3.10 lacks `X | Y` here)
Plan = Generator[Action, Any, T]
# url -> (the request of this try, a callback run once the try is over, answered or not)
TryAt = Callable[[str], tuple[Send, Callable[[], None]]]


def retried(attempts: Attempts, try_at: TryAt) -> Plan[tuple[str, httpx.Response]]:
    """Try until a reply is the answer (< 400): returns (server, reply); raises what
    `attempts` decides (rejection, overload, unreachable, timeout)."""
    while True:
        url = attempts.next_url()
        send, done = try_at(url)
        try:
            resp = yield send
        except httpx.HTTPError as exc:
            if send.abort is not None and isinstance(exc, MAYBE_RUNNING):
                yield send.abort  # the server may still be generating it
            yield Sleep(attempts.failed(url, exc))
            continue
        finally:
            done()
        delay = attempts.answered(url, resp)
        if delay is None:
            return url, resp
        yield Sleep(delay)


def _next(plan: Plan[T], reply: Any, error: BaseException | None) -> tuple[bool, Any]:
    """(finished, result or next action) of one step of `plan`."""
    try:
        return False, plan.throw(error) if error is not None else plan.send(reply)
    except StopIteration as stop:
        return True, stop.value


def run(plan: Plan[T], http: httpx.Client) -> T:
    """Drive `plan` with blocking I/O."""
    reply, error = None, None
    with contextlib.closing(plan):  # an interrupt still runs the plan's bookkeeping
        while True:
            finished, action = _next(plan, reply, error)
            if finished:
                return action
            reply, error = None, None
            if isinstance(action, Sleep):
                time.sleep(action.seconds)
                continue
            try:
                reply = http.request(action.method, action.url, **action.kwargs)
            except httpx.HTTPError as exc:
                error = None if action.quiet else exc


async def arun(plan: Plan[T], http: httpx.AsyncClient) -> T:
    """Drive `plan` with asyncio; a cancelled caller aborts the request in flight."""
    reply, error = None, None
    with contextlib.closing(plan):
        while True:
            finished, action = _next(plan, reply, error)
            if finished:
                return action
            reply, error = None, None
            if isinstance(action, Sleep):
                await asyncio.sleep(action.seconds)
                continue
            try:
                reply = await http.request(action.method, action.url, **action.kwargs)
            except httpx.HTTPError as exc:
                error = None if action.quiet else exc
            except asyncio.CancelledError:  # the caller gave up: free the server's slot
                if action.abort is not None:
                    await asyncio.shield(_quietly(http, action.abort))
                raise


async def _quietly(http: httpx.AsyncClient, send: Send) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await http.request(send.method, send.url, **send.kwargs)
