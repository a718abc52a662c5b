"""asyncio front of the engine, for the server.

The engine runs in one background thread; everything that touches its state (new requests,
aborts, pause, weight swaps) is sent to that thread as a command and runs between steps, so
a weight swap is atomic with respect to decoding. Each request gets an asyncio queue of
cumulative `RequestOutput`s.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch

from bebop_spec.engine.config import PAUSE_MODES, EngineConfig
from bebop_spec.engine.llm_engine import LLMEngine
from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats
from bebop_spec.errors import BebopError
from bebop_spec.models import LoadedModel
from bebop_spec.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineStepError(BebopError):
    """The engine failed while running this request's step; other requests keep going."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.engine = LLMEngine(config, loaded)
        self.config = config
        self._cmds: queue.Queue[tuple[Callable[[], Any], asyncio.Future]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ properties
    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def weight_version(self) -> str:
        return self.engine.weight_version

    @property
    def version_labels(self) -> dict[int, str]:
        return self.engine.version_labels

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def spec_totals(self) -> SpecStats:
        return self.engine.spec_totals

    @property
    def gamma_chosen(self) -> list[int] | None:
        """Decode steps per draft length γ_t = 0, 1, … under the auto policy; None otherwise."""
        policy = self.engine.gamma_policy
        return list(policy.chosen) if policy is not None else None

    @property
    def kv_cache_info(self) -> dict:
        """The paged KV pool now: blocks, use, preemptions and prefix-cache hit rate."""
        e = self.engine
        q, h = e.blocks.stats.queried_tokens, e.blocks.stats.hit_tokens
        return {"num_blocks": e.blocks.num_blocks, "block_size": e.blocks.block_size,
                "blocks_used": e.blocks.num_used, "num_preemptions": e.scheduler.num_preemptions,
                "prefix_cache_hit_rate": h / q if q else 0.0}  # fmt: skip

    def add_observer(self, fn: Callable[[StepStats], None]) -> None:
        self.engine.observers.append(fn)

    def weight_spec(self, selector: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self.engine.weight_spec(selector)

    def weight_aliases(self, selector: str) -> dict[str, str]:
        return self.engine.weight_aliases(selector)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="bebop-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        await self.abort_all()
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if self._paused or not self.engine.has_unfinished():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # contain: fail the in-flight requests, keep serving
                log.exception("engine step failed")
                self._fail_running(exc)
                continue
            for rid, message in self.engine.failed.items():
                self._publish(EngineStepError(message), rid)
            self.engine.failed.clear()
            for out in outputs:
                self._publish(out)

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            self._resolve(fut, result, error)

    def _resolve(self, fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
        def done() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(done)

    def _publish(self, item: RequestOutput | BaseException, rid: str | None = None) -> None:
        rid = rid if rid is not None else item.request_id  # type: ignore[union-attr]
        q = self._streams.get(rid)
        if q is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_running(self, exc: BaseException) -> None:
        for seq in list(self.engine.scheduler.running):
            rid = seq.request_id
            self.engine.abort(rid)
            self._publish(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"), rid)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None:
            await self.start()
        assert self._loop is not None
        fut = self._loop.create_future()
        self._cmds.put((fn, fut))
        self._wake.set()
        return await fut

    # ------------------------------------------------------------------ requests
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; closing the iterator early aborts it."""
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            from bebop_spec.errors import InvalidRequest

            raise InvalidRequest(f"request id {request_id!r} is already running")
        self._streams[request_id] = q
        finished = False
        try:
            ids = list(prompt_token_ids)
            await self._call(lambda: self.engine.add_request(request_id, ids, params))
            while True:
                item = await q.get()
                while not q.empty():  # outputs are cumulative: skip to the newest
                    item = q.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                await self._abort_quietly(request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self._call(lambda: self.engine.abort(request_id)))
        except Exception:  # the engine may be shutting down
            log.debug("abort of %s after disconnect failed", request_id, exc_info=True)

    async def abort(self, request_id: str) -> bool:
        out = await self._call(lambda: self.engine.abort(request_id))
        if out is not None:
            self._publish(out)
        return out is not None

    async def abort_all(self) -> int:
        outs = await self._call(self.engine.abort_all)
        for out in outs:
            self._publish(out)
        return len(outs)

    async def pause(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} must be one of {', '.join(PAUSE_MODES)}")

        def do() -> None:
            self._paused = True
            if mode == "abort":
                for out in self.engine.abort_all():
                    self._publish(out)
            elif mode == "retract":
                self.engine.retract_all()

        await self._call(do)

    async def resume(self) -> None:
        def do() -> None:
            self._paused = False

        await self._call(do)

    async def release_kv(self) -> int:
        """Pause (retracting every running request) and free the KV pool; resume() continues
        and the next step allocates the pool again. Returns bytes freed."""
        await self.pause("retract")
        return await self._call(self.engine.release_kv)

    async def update_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        selector: str = "target",
        weight_version: str | None = None,
    ) -> str:
        return await self._call(
            lambda: self.engine.update_weights(tensors, selector, weight_version)
        )

    async def weight_checksums(self, selector: str = "target") -> dict[str, str]:
        """Digests read on the engine thread, between steps (never a half-applied update)."""
        return await self._call(lambda: self.engine.weight_checksums(selector))

    async def relabel_weight_version(self, label: str) -> str:
        return await self._call(lambda: self.engine.relabel_weight_version(label))

    async def flush_cache(self) -> int:
        return await self._call(self.engine.flush_cache)
