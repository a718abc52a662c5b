"""The server's view of requests a remote engine runs: counts, step stats, spec totals.

A remote engine (vLLM, SGLang) schedules in its own processes and exposes neither its
steps nor its queues, so `RemoteBackend` derives what the `ServingBackend` surface reports
from the output stream of each request: waiting until its first output, running until it
finishes; one `StepStats` per output increment for the observers (the metrics); the spec
counters of each finished request added to the engine's totals.
"""

from __future__ import annotations

from collections.abc import Callable

from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats


class RequestLedger:
    """Requests in flight (waiting / running ids), observers, and the spec totals."""

    def __init__(self, draft_mode: str) -> None:
        self.draft_mode = draft_mode  # StepStats.draft_mode: "rs" | "to" | "none"
        self.spec_totals = SpecStats()
        self.observers: list[Callable[[StepStats], None]] = []
        self.waiting: set[str] = set()
        self.running: set[str] = set()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.running or request_id in self.waiting

    def ids(self) -> list[str]:
        """Every request in flight, sorted."""
        return sorted(self.running | self.waiting)

    def track(self, request_id: str, started: bool, finished: bool) -> None:
        """Move a request: waiting (not started), running (started), gone (finished)."""
        if finished:
            self.waiting.discard(request_id)
            self.running.discard(request_id)
        elif started:
            self.waiting.discard(request_id)
            self.running.add(request_id)
        else:
            self.waiting.add(request_id)

    def observe(self, new_tokens: int, spec: SpecStats | None) -> None:
        """One StepStats per output increment (remote engines do not expose their steps);
        `spec`: a finished request's counters, added to the totals."""
        if spec is not None:
            self.spec_totals = self.spec_totals.merge(spec)
        if not self.observers:
            return
        stats = StepStats(
            draft_mode=self.draft_mode,
            num_generated_tokens=new_tokens,
            num_drafts=spec.num_drafts if spec else 0,
            num_draft_tokens=spec.num_draft_tokens if spec else 0,
            num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            accepted_per_pos=list(spec.accepted_per_pos) if spec else [],
            num_running=len(self.running),
            num_waiting=len(self.waiting),
        )
        for fn in self.observers:
            fn(stats)


def new_tokens(prev: RequestOutput | None, cur: RequestOutput) -> int:
    """Tokens `cur` adds to `prev` (cumulative outputs of one request), over its samples."""
    before = sum(len(o.token_ids) for o in prev.outputs) if prev else 0
    return sum(len(o.token_ids) for o in cur.outputs) - before
