"""Asyncio rollout client: the same calls as `RolloutClient`, awaitable.

    async with AsyncRolloutClient(urls) as client:
        groups = await asyncio.gather(*(client.generate(p, params, n=8) for p in prompts))

At most `max_concurrency` requests are in flight per client; the rest wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import httpx

from bebop_client.base import ClientBase, Params, json_of
from bebop_client.metrics import Metrics, parse_metrics
from bebop_client.sample import Sample, parse_sample
from bebop_client.transport import MAYBE_RUNNING, Attempts


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
        attempts = Attempts(self.retry, self.pool, url, what=f"{method} {path}")
        headers = {**self.headers, **kwargs.pop("headers", {})}
        while True:
            server = attempts.next_url()
            try:
                resp = await self._http.request(method, server + path, headers=headers,
                                                timeout=self._timeout(timeout), **kwargs)  # fmt: skip
            except httpx.HTTPError as exc:
                await asyncio.sleep(attempts.failed(server, exc))
                continue
            delay = attempts.answered(server, resp)
            if delay is None:
                return resp
            await asyncio.sleep(delay)

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
        rid = body["rid"]
        attempts = Attempts(self.retry, self.pool, what=f"generate {rid}")
        async with self._semaphore():
            while True:
                url = attempts.next_url()
                sent = self._retry_rid(body, rid, attempts)
                self._track(sent, url)
                self.pool.begin(url)
                try:
                    resp = await self._http.post(url + "/generate", json=body, headers=self.headers,
                                                 timeout=self._timeout(timeout))  # fmt: skip
                except httpx.HTTPError as exc:
                    if isinstance(exc, MAYBE_RUNNING):  # the server may still be generating it
                        await self._abort_quietly(url, sent)
                    await asyncio.sleep(attempts.failed(url, exc))
                    continue
                except asyncio.CancelledError:  # the caller gave up: free the server's slot
                    await asyncio.shield(self._abort_quietly(url, sent))
                    raise
                finally:
                    self.pool.end(url)
                    self._track(sent, None)
                delay = attempts.answered(url, resp)
                if delay is None:
                    return parse_sample(json_of(resp, "/generate"), prompt_ids, rid, url)
                await asyncio.sleep(delay)

    async def _abort_quietly(self, url: str, rid: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._http.post(url + "/abort_request", json={"rid": rid}, headers=self.headers,
                                  timeout=self.connect_timeout_s)  # fmt: skip

    # --------------------------------------------------------------- control
    async def abort(self, rid: str) -> int:
        """Abort `rid` (or a group started with that rid); see RolloutClient.abort."""
        replies = await asyncio.gather(
            *(self.post("/abort_request", {"rid": rid}, url=u) for u in self._servers_of(rid))
        )
        return sum(int((r or {}).get("num_aborted", 0)) for r in replies)

    async def abort_all(self) -> int:
        replies = await self.each("/abort_request", {"abort_all": True})
        return sum(int((r or {}).get("num_aborted", 0)) for r in replies.values())

    async def pause(self, mode: str = "in_place") -> None:
        await self.each("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self.each("/continue_generation", {})

    async def weight_versions(self) -> dict[str, str]:
        replies = await asyncio.gather(*(self.get("/get_weight_version", url=u) for u in self.urls))
        return {u: str(r["weight_version"]) for u, r in zip(self.urls, replies, strict=True)}

    async def model_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.get("/get_model_info", url=url or self.urls[0])

    async def health(self, url: str | None = None) -> bool:
        try:
            codes = [(await self._http.get(u + "/health", timeout=self.connect_timeout_s)).status_code
                     for u in ([url] if url else self.urls)]  # fmt: skip
        except httpx.HTTPError:
            return False
        return all(c == 200 for c in codes)

    async def metrics(self, url: str | None = None) -> Metrics:
        resp = await self.request("GET", "/metrics", url=url or self.urls[0])
        return parse_metrics(resp.text)
