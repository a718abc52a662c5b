"""Helpers shared by the serving classes: prompt checks, sampling params, version spans,
merging several engine streams, and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, StreamingResponse

from bebop_spec.backends import ServingBackend
from bebop_spec.engine.outputs import SpecStats
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.server.errors import ApiError, bad_request

T = TypeVar("T")

UNSUPPORTED_MSG = "{name} is not supported by this server (only the default {default!r})"
# log 0 as vLLM writes it: −∞ is not JSON (Python's json refuses it, orjson writes null).
LOGPROB_FLOOR = -9999.0


def json_logprob(lp: float) -> float:
    """A logprob JSON can carry: −∞ (an alternative that top-k / top-p / T = 0 gave
    probability 0) and NaN become LOGPROB_FLOOR; anything above it passes unchanged."""
    return lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR


def reject_unsupported(fields: dict[str, tuple[Any, Any]]) -> None:
    """400 for each `name: (value, default)` whose value is set to something else."""
    for name, (value, default) in fields.items():
        if value is None or value == default or (value == {} and default is None):
            continue
        raise bad_request(UNSUPPORTED_MSG.format(name=name, default=default), param=name)


def make_sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams(**kwargs) with its ValueError turned into a 400."""
    try:
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    except (ValueError, TypeError) as exc:
        raise bad_request(str(exc)) from exc


class PromptChecker:
    """Token-level prompt checks done before the engine sees a request."""

    def __init__(self, engine: ServingBackend) -> None:
        self.vocab_size = int(engine.model_config.vocab_size)
        self.max_model_len = int(engine.max_model_len)

    def check(self, ids: Sequence[int], param: str = "prompt") -> list[int]:
        if len(ids) == 0:
            raise bad_request("prompt is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise bad_request(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                "tokens (prompt + at least one generated token)",
                param=param,
            )
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param
            )
        return list(ids)

    def max_new_tokens(self, prompt_len: int, requested: int | None, *, clamp: bool) -> int:
        """Tokens the request may generate: `requested`, bounded by the context left."""
        room = self.max_model_len - prompt_len
        if requested is None:
            return room
        if requested > room and not clamp:
            raise bad_request(
                f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds the "
                f"context length {self.max_model_len}",
                param="max_tokens",
            )
        return min(requested, room)


def version_spans(token_versions: Sequence[int], labels: dict[int, str]) -> list[dict[str, Any]]:
    """Per-token version counters -> [{version: label, start, end}] runs (SGLang's shape)."""
    spans: list[dict[str, Any]] = []
    start = 0
    for v, run in itertools.groupby(token_versions):
        end = start + sum(1 for _ in run)
        label = labels.get(v, str(v))
        if spans and spans[-1]["version"] == label:
            spans[-1]["end"] = end
        else:
            spans.append({"version": label, "start": start, "end": end})
        start = end
    return spans


def spec_info(spec: SpecStats) -> dict[str, Any]:
    return {
        "num_drafts": spec.num_drafts,
        "num_draft_tokens": spec.num_draft_tokens,
        "num_accepted_tokens": spec.num_accepted_tokens,
        "accepted_per_pos": list(spec.accepted_per_pos),
        "acceptance_rate": spec.acceptance_rate,
        "mean_accepted_length": spec.mean_accepted_length,
    }


class TokenText:
    """Per-token strings for logprob tables (cached; `token_id:N` without a tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id])
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = text
        return text


class AdmissionGate:
    """Holds new generation requests in the server while closed (vLLM's pause mode
    "wait": in-flight requests finish, new ones do not start)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive; closes all of them on exit."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, None))
            await queue.put((i, done, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, done, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                raise exc
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in streams:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]


async def start_streams(streams: Sequence[AsyncIterator[T]]) -> list[AsyncIterator[T]]:
    """Advance each stream once, so that validation and overload errors surface before a
    reply starts; returns equivalent streams. On an error every stream is closed (aborted)."""
    firsts: list[T] = []
    try:
        for s in streams:
            firsts.append(await s.__anext__())
    except BaseException:
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()  # type: ignore[attr-defined]
        raise
    return [_prepend(first, s) for first, s in zip(firsts, streams, strict=True)]


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def last_item(stream: AsyncIterator[T]) -> T:
    last = None
    async for item in stream:
        last = item
    return last  # type: ignore[return-value]


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; cancel it (aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        with contextlib.suppress(Exception):  # a broken receive channel counts as gone
            while (await request.receive())["type"] != "http.disconnect":
                pass

    watcher = asyncio.ensure_future(watch())
    hung_up = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (server shutdown)
        watcher.cancel()
        if not task.done():
            hung_up = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let the aborts run
    if hung_up:  # not task.cancelled(): a cancelled gather() *fails* with CancelledError,
        raise ApiError(499, "client disconnected")  # which reached uvicorn as a traceback
    return task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (and close the body iterator, aborting its engine
    requests) as soon as the client disconnects, even while no token is being produced."""

    def __init__(self, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.headers["Cache-Control"] = "no-cache"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError, ClientDisconnect):
                await self.stream_response(send)

        streaming = asyncio.ensure_future(stream())
        listening = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.gather(streaming, listening, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[union-attr]


try:  # optional: several times faster than json for the per-token stream events
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover - orjson is optional

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return dumps(content)
        except (TypeError, ValueError) as exc:  # a handled 500, never an ASGI crash
            raise ApiError(500, f"reply is not valid JSON: {exc}", code="invalid_reply") from exc


def sse(payload: Any) -> bytes:
    """One SSE event carrying a pydantic model or a JSON-able dict."""
    if hasattr(payload, "model_dump_json"):
        return b"data: " + payload.model_dump_json(exclude_none=True).encode() + b"\n\n"
    return b"data: " + dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def metered_sse(metrics: Any, body: AsyncIterator[bytes],
                      finished: Callable[[], list]) -> AsyncIterator[bytes]:  # fmt: skip
    """`body`'s events, then [DONE]. The reply counts as a success (with `finished()`'s final
    outputs), as 499 when the client hangs up mid-stream, or as 500 when generation fails
    after the reply started — reported in-band, as SGLang and vLLM do."""
    async with contextlib.aclosing(body):
        try:
            async for event in body:
                yield event
        except GeneratorExit:  # the client hung up mid-stream
            metrics.failed("generation", 499)
            raise
        except Exception as exc:  # the reply has started: report in-band
            metrics.failed("generation", 500)
            yield sse(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}").body())
        else:
            metrics.succeeded(finished())
    yield SSE_DONE
