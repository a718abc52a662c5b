"""Asyncio rollout client: the same calls as `RolloutClient`, awaitable.

    async with AsyncRolloutClient(urls) as client:
        groups = await asyncio.gather(*(client.generate(p, params, n=8) for p in prompts))

At most `max_concurrency` requests are in flight per client; the rest wait their turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bebop_client.base import ClientBase, Params, json_of, num_aborted, weight_version_of
from bebop_client.calls import arun
from bebop_client.metrics import Metrics, parse_metrics
from bebop_client.sample import Sample
from bebop_client.vocab import PauseMode


class AsyncRolloutClient(ClientBase):
    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(urls, **kwargs)
        self._http = httpx.AsyncClient(
            timeout=self._timeout(None),
            limits=httpx.Limits(max_connections=self.max_concurrency + 8),
        )
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        return self._slots

    # ------------------------------------------------------------------ HTTP
    async def request(self, method: str, path: str, *, url: str | None = None,
                      timeout: float | None = None, **kwargs: Any) -> httpx.Response:  # fmt: skip
        """One call with retries; `url=None` lets the pool choose the server."""
        return await arun(self._request_plan(method, path, url, timeout, kwargs), self._http)

    async def post(self, path: str, body: Any = None, *, url: str | None = None, **kw: Any) -> Any:
        resp = await self.request("POST", path, url=url, json=body, **kw)
        return json_of(resp, path) if resp.content else None

    async def get(self, path: str, *, url: str | None = None, **kw: Any) -> Any:
        return json_of(await self.request("GET", path, url=url, **kw), path)

    async def each(self, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        replies = await asyncio.gather(*(self.post(path, body, url=u, **kw) for u in self.urls))
        return dict(zip(self.urls, replies, strict=True))

    # ------------------------------------------------------------ generation
    async def generate(self, prompt_ids: Sequence[int], sampling_params: Params = None, *,
                       n: int = 1, rid: str | None = None, return_logprob: bool = True,
                       timeout: float | None = None) -> list[Sample]:  # fmt: skip
        """n samples of one prompt, as n concurrent requests; in sample order."""
        bodies = self._bodies(prompt_ids, sampling_params, n, rid, return_logprob)
        return list(await asyncio.gather(*(self._one(b, prompt_ids, timeout) for b in bodies)))

    async def generate_batch(self, prompts: Sequence[Sequence[int]], sampling_params: Params = None,
                             *, n: int = 1, rid: str | None = None, return_logprob: bool = True,
                             timeout: float | None = None) -> list[list[Sample]]:  # fmt: skip
        return list(await asyncio.gather(*(
            self.generate(p, sampling_params, n=n, rid=f"{rid}-{i}" if rid else None,
                          return_logprob=return_logprob, timeout=timeout)
            for i, p in enumerate(prompts)
        )))  # fmt: skip

    async def _one(self, body: dict[str, Any], prompt_ids: Sequence[int],
                   timeout: float | None) -> Sample:  # fmt: skip
        async with self._semaphore():
            return await arun(self._generate_plan(body, prompt_ids, timeout), self._http)

    # --------------------------------------------------------------- control
    async def abort(self, rid: str) -> int:
        """Abort `rid` (or a group started with that rid); see RolloutClient.abort."""
        replies = await asyncio.gather(
            *(self.post("/abort_request", {"rid": rid}, url=u) for u in self._servers_of(rid))
        )
        return num_aborted(replies)

    async def abort_all(self) -> int:
        return num_aborted((await self.each("/abort_request", {"abort_all": True})).values())

    async def pause(self, mode: str = PauseMode.IN_PLACE) -> None:
        """Pause every server; the modes are RolloutClient.pause's."""
        await self.each("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self.each("/continue_generation", {})

    async def flush_cache(self) -> None:
        await asyncio.gather(*(self.request("POST", "/flush_cache", url=u) for u in self.urls))

    async def weight_versions(self) -> dict[str, str]:
        """{url: weight_version label} of every server."""
        replies = await asyncio.gather(*(self.get("/get_weight_version", url=u) for u in self.urls))
        return {u: weight_version_of(r) for u, r in zip(self.urls, replies, strict=True)}

    async def model_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.get("/get_model_info", url=url or self.urls[0])

    async def server_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.get("/get_server_info", url=url or self.urls[0])

    async def health(self, url: str | None = None) -> bool:
        """True when `url` (default: every server) answers /health with 200; no retries."""
        try:
            codes = [(await self._http.get(u + "/health", timeout=self.connect_timeout_s)).status_code
                     for u in ([url] if url else self.urls)]  # fmt: skip
        except httpx.HTTPError:
            return False
        return all(c == 200 for c in codes)

    async def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not await self.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"servers not healthy after {timeout}s: {self.urls}")
            await asyncio.sleep(interval)

    # --------------------------------------------------------------- metrics
    async def metrics_text(self, url: str | None = None) -> str:
        return (await self.request("GET", "/metrics", url=url or self.urls[0])).text

    async def metrics(self, url: str | None = None) -> Metrics:
        """Parsed /metrics of one server (default: the first)."""
        return parse_metrics(await self.metrics_text(url))
