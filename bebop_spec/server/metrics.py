"""Prometheus metrics at `/metrics`, mirroring vLLM's names with a `bebop:` prefix.

Sources: the engine calls `observe_step` after every step (engine thread; prometheus-client
is thread-safe); the serving layer wraps each request's output stream in `track` for
TTFT / inter-token / end-to-end latency, and reports `succeeded` once a reply is written
out or `failed` when the request ends in an error (so a reply that could not be built is
never a success); weight sync reports `observe_weight_sync`.
Each app owns its registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from bebop_spec.backends import ServingBackend
from bebop_spec.engine.outputs import RequestOutput, StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Entropy (nats) bucket edges for the acceptance-by-entropy counters and histogram.
ENTROPY_EDGES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, math.inf)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
SYNC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def entropy_bucket(h: float) -> str:
    """Label of the bucket [lo, hi) holding entropy h, e.g. "0.50-1.00" or "4.00-inf"."""
    for lo, hi in zip(ENTROPY_EDGES, ENTROPY_EDGES[1:], strict=False):
        if h < hi:
            return f"{lo:.2f}-{hi:.2f}" if hi != math.inf else f"{lo:.2f}-inf"
    return f"{ENTROPY_EDGES[-2]:.2f}-inf"


class ServerMetrics:
    def __init__(self, engine: ServingBackend, model_name: str) -> None:
        disable_created_metrics()  # no `_created` series (as vLLM)
        self.engine = engine
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self._m = model_name

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"bebop:{name}", doc, [*m, *labels], registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"bebop:{name}", doc, [*m, *labels], registry=r)

        def hist(name: str, doc: str, buckets, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(f"bebop:{name}", doc, [*m, *labels], buckets=buckets, registry=r)

        self.num_drafts = counter("spec_decode_num_drafts", "Verification steps with drafts.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.num_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by draft position (0-based).",
            ("position",),
        )
        self.target_entropy = hist(
            "spec_decode_target_entropy",
            "Entropy (nats) of the processed target distribution at verified draft positions.",
            ENTROPY_EDGES[1:-1],
        )
        self.verified_by_entropy = counter(
            "spec_decode_verified_tokens_by_entropy",
            "Verified draft positions by target-entropy bucket (nats).",
            ("entropy_bucket",),
        )
        self.accepted_by_entropy = counter(
            "spec_decode_accepted_tokens_by_entropy",
            "Accepted draft positions by target-entropy bucket (nats).",
            ("entropy_bucket",),
        )
        self.gamma = hist(
            "spec_decode_draft_length",
            "Drafts per row chosen for each decode step (0: a plain step; the auto policy "
            "chooses it per step, the fixed one always drafts num_speculative_tokens).",
            tuple(range(9)),
        )
        self.draft_mode = gauge(
            "spec_decode_draft_mode_info", "Draft mode (1 = active).", ("draft_mode",)
        )
        self.weight_version = gauge("weight_version", "Weight version counter (+1 per update).")
        self.weight_version_info = gauge(
            "weight_version_info", "Serving weight label.", ("version",)
        )
        self.sync_seconds = hist(
            "weight_sync_duration_seconds",
            "Weight update duration by path.",
            SYNC_BUCKETS,
            ("source",),
        )
        self.sync_bytes = counter(
            "weight_sync_bytes", "Bytes received by weight updates.", ("source",)
        )
        self.sync_failures = counter(
            "weight_sync_failures", "Rejected weight updates.", ("source",)
        )
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.kv_blocks = gauge("kv_cache_blocks", "KV blocks by state.", ("state",))
        self.preemptions = counter(
            "num_preemptions", "Sequences preempted (blocks freed, recomputed later)."
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prefill tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prefill tokens served by cached prefix blocks."
        )
        self.running = gauge("num_requests_running", "Requests being decoded.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.step_seconds = hist(
            "engine_step_duration_seconds", "Engine step time.", LATENCY_BUCKETS
        )
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = hist(
            "inter_token_latency_seconds", "Time per output token after the first.", LATENCY_BUCKETS
        )
        self.e2e = hist("e2e_request_latency_seconds", "Request latency.", LATENCY_BUCKETS)
        self.request_success = counter(
            "request_success", "Samples whose reply was delivered.", ("finished_reason",)
        )
        self.request_failure = counter(
            "request_failure",
            "Generation requests that ended in an error, by stage (input_processing: before "
            "generation started; generation: after) and HTTP status (in-band errors: 500).",
            ("stage", "code"),
        )

        self.running.labels(model_name).set_function(lambda: engine.num_running)
        self.waiting.labels(model_name).set_function(lambda: engine.num_waiting)
        self.weight_version.labels(model_name).set_function(lambda: engine.version)
        self.draft_mode.labels(model_name, engine.config.draft_mode_name).set(1)
        self.refresh_version()
        engine.add_observer(self.observe_step)

    def refresh_version(self) -> None:
        self.weight_version_info.clear()
        self.weight_version_info.labels(self._m, self.engine.weight_version).set(1)

    def observe_step(self, st: StepStats) -> None:
        m = self._m
        self.prompt_tokens.labels(m).inc(st.num_prompt_tokens)
        self.generation_tokens.labels(m).inc(st.num_generated_tokens)
        self.step_seconds.labels(m).observe(st.step_seconds)
        self._observe_kv(st)
        if st.gamma is not None and self.engine.config.draft_mode:
            self.gamma.labels(m).observe(st.gamma)
        if st.num_drafts:
            self.num_drafts.labels(m).inc(st.num_drafts)
            self.num_draft_tokens.labels(m).inc(st.num_draft_tokens)
            self.num_accepted.labels(m).inc(st.num_accepted_tokens)
            for pos, n in enumerate(st.accepted_per_pos):
                self.accepted_per_pos.labels(m, str(pos)).inc(n)
        for h, ok in zip(st.verified_entropies, st.verified_accepted, strict=False):
            self.target_entropy.labels(m).observe(h)
            bucket = entropy_bucket(h)
            self.verified_by_entropy.labels(m, bucket).inc()
            accepted = self.accepted_by_entropy.labels(m, bucket)  # exists (at 0) once verified
            if ok:
                accepted.inc()

    def _observe_kv(self, st: StepStats) -> None:
        m = self._m
        if st.kv_blocks_total:
            self.kv_usage.labels(m).set(st.kv_blocks_used / st.kv_blocks_total)
            self.kv_blocks.labels(m, "used").set(st.kv_blocks_used)
            self.kv_blocks.labels(m, "free").set(st.kv_blocks_total - st.kv_blocks_used)
        self.preemptions.labels(m).inc(st.num_preemptions)
        self.prefix_queries.labels(m).inc(st.prefix_queried_tokens)
        self.prefix_hits.labels(m).inc(st.prefix_hit_tokens)

    def observe_weight_sync(self, source: str, seconds: float, nbytes: int, ok: bool) -> None:
        if ok:
            self.sync_seconds.labels(self._m, source).observe(seconds)
            self.sync_bytes.labels(self._m, source).inc(nbytes)
            self.refresh_version()
        else:
            self.sync_failures.labels(self._m, source).inc()

    async def track(
        self, stream: AsyncIterator[RequestOutput], arrival: float
    ) -> AsyncIterator[RequestOutput]:
        """Pass `stream` through, timing first token, later tokens and completion."""
        m, last, seen = self._m, None, 0
        try:
            async for out in stream:
                now = time.perf_counter()
                total = sum(len(o.token_ids) for o in out.outputs)
                if total > seen:
                    if last is None:
                        self.ttft.labels(m).observe(now - arrival)
                    else:
                        per_token = (now - last) / (total - seen)
                        for _ in range(total - seen):
                            self.itl.labels(m).observe(per_token)
                    last, seen = now, total
                if out.finished:
                    self.e2e.labels(m).observe(now - arrival)
                yield out
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def succeeded(self, finals: list[RequestOutput]) -> None:
        """The reply carrying these finished requests was written out: count its samples."""
        for out in finals:
            for o in out.outputs:
                self.request_success.labels(self._m, o.finish_reason or "abort").inc()

    def failed(self, stage: str, code: int) -> None:
        """A generation request ended in an error instead of a reply (stage as vLLM's
        `request_failure`: input_processing or generation)."""
        self.request_failure.labels(self._m, stage, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
