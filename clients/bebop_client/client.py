"""Synchronous rollout client: groups of token-in/token-out samples, control, metrics.

    from bebop_client import RolloutClient
    with RolloutClient(["http://10.0.0.1:30000", "http://10.0.0.2:30000"]) as client:
        group = client.generate(prompt_ids, {"temperature": 1.0, "max_new_tokens": 512}, n=8)
        logprobs = [s.logprobs for s in group]

Each sample is its own /generate request (spread over the servers), so a group can land on
several servers and one slow sample never holds the others back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bebop_client.base import ClientBase, Params, json_of, num_aborted, weight_version_of
from bebop_client.calls import run
from bebop_client.metrics import Metrics, parse_metrics
from bebop_client.sample import Sample
from bebop_client.vocab import PauseMode


class RolloutClient(ClientBase):
    """Thread-safe; samples of a call run concurrently on up to `max_concurrency` threads."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(urls, **kwargs)
        self._http = httpx.Client(
            timeout=self._timeout(None),
            limits=httpx.Limits(max_connections=self.max_concurrency + 8),
        )
        self._workers: ThreadPoolExecutor | None = None

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, *, url: str | None = None,
                timeout: float | None = None, **kwargs: Any) -> httpx.Response:  # fmt: skip
        """One call with retries; `url=None` lets the pool choose the server."""
        return run(self._request_plan(method, path, url, timeout, kwargs), self._http)

    def post(self, path: str, body: Any = None, *, url: str | None = None, **kw: Any) -> Any:
        resp = self.request("POST", path, url=url, json=body, **kw)
        return json_of(resp, path) if resp.content else None

    def get(self, path: str, *, url: str | None = None, **kw: Any) -> Any:
        return json_of(self.request("GET", path, url=url, **kw), path)

    def each(self, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        """POST to every server; {url: reply}."""
        return {u: self.post(path, body, url=u, **kw) for u in self.urls}

    # ------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[int], sampling_params: Params = None, *, n: int = 1,
                 rid: str | None = None, return_logprob: bool = True,
                 timeout: float | None = None) -> list[Sample]:  # fmt: skip
        """n samples of one prompt, as n separate requests; in sample order."""
        bodies = self._bodies(prompt_ids, sampling_params, n, rid, return_logprob)
        if n == 1:
            return [self._one(bodies[0], prompt_ids, timeout)]
        return list(self._pool().map(lambda b: self._one(b, prompt_ids, timeout), bodies))

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling_params: Params = None,
                       *, n: int = 1, rid: str | None = None, return_logprob: bool = True,
                       timeout: float | None = None) -> list[list[Sample]]:  # fmt: skip
        """n samples for each prompt, all in flight together; result[i] is prompt i's group."""
        jobs = [
            (b, p)
            for i, p in enumerate(prompts)
            for b in self._bodies(
                p, sampling_params, n, f"{rid}-{i}" if rid else None, return_logprob
            )  # fmt: skip
        ]
        flat = list(self._pool().map(lambda j: self._one(j[0], j[1], timeout), jobs))
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _pool(self) -> ThreadPoolExecutor:
        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="bebop")
        return self._workers

    def _one(
        self, body: dict[str, Any], prompt_ids: Sequence[int], timeout: float | None
    ) -> Sample:
        return run(self._generate_plan(body, prompt_ids, timeout), self._http)

    # --------------------------------------------------------------- control
    def abort(self, rid: str) -> int:
        """Abort `rid` (or a group started with that rid); its samples come back with
        finish_reason "abort". Returns how many requests the servers aborted."""
        replies = [self.post("/abort_request", {"rid": rid}, url=u) for u in self._servers_of(rid)]
        return num_aborted(replies)

    def abort_all(self) -> int:
        return num_aborted(self.each("/abort_request", {"abort_all": True}).values())

    def pause(self, mode: str = PauseMode.IN_PLACE) -> None:
        """Pause every server: "in_place" keeps requests and resumes them later, "abort"
        ends them (finish_reason abort), "retract" re-queues them."""
        self.each("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.each("/continue_generation", {})

    def flush_cache(self) -> None:
        for u in self.urls:
            self.request("POST", "/flush_cache", url=u)

    def weight_versions(self) -> dict[str, str]:
        """{url: weight_version label} of every server."""
        return {u: weight_version_of(self.get("/get_weight_version", url=u)) for u in self.urls}

    def model_info(self, url: str | None = None) -> dict[str, Any]:
        return self.get("/get_model_info", url=url or self.urls[0])

    def server_info(self, url: str | None = None) -> dict[str, Any]:
        return self.get("/get_server_info", url=url or self.urls[0])

    def health(self, url: str | None = None) -> bool:
        """True when `url` (default: every server) answers /health with 200; no retries."""
        try:
            return all(self._http.get(u + "/health", timeout=self.connect_timeout_s).status_code
                       == 200 for u in ([url] if url else self.urls))  # fmt: skip
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"servers not healthy after {timeout}s: {self.urls}")
            time.sleep(interval)

    # --------------------------------------------------------------- metrics
    def metrics_text(self, url: str | None = None) -> str:
        return self.request("GET", "/metrics", url=url or self.urls[0]).text

    def metrics(self, url: str | None = None) -> Metrics:
        """Parsed /metrics of one server (default: the first)."""
        return parse_metrics(self.metrics_text(url))
