"""Continuous-batching scheduler: plain Python objects, no tensors (unit-testable alone).

Each step is either a prefill of newly admitted sequences or a decode step over everything
running (nano-vllm's policy): waiting sequences are admitted as soon as a KV slot frees up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from bebop_spec.engine.sequence import SeqStatus, Sequence
from bebop_spec.errors import EngineOverloaded


@dataclass
class Batch:
    kind: str  # "prefill" | "decode"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.free_slots: list[int] = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the samples of one request, all or none."""
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise EngineOverloaded(
                f"waiting queue full ({len(self.waiting)} waiting, limit {self.max_waiting})"
            )
        self.waiting.extend(seqs)

    def schedule(self) -> Batch | None:
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            cost = prefill_len(seq)
            if admitted and cost > budget:
                break
            self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            budget -= cost
        if admitted:
            self.running.extend(admitted)
            return Batch("prefill", admitted)
        if self.running:
            return Batch("decode", list(self.running))
        return None

    def release(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence from the queues and free its slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def retract_all(self) -> list[Sequence]:
        """Move running sequences back to the front of the queue; their K/V will be recomputed."""
        retracted = list(self.running)
        for seq in reversed(retracted):
            self.running.remove(seq)
            if seq.slot is not None:
                self.free_slots.append(seq.slot)
            seq.reset_cache_state()
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)
        return retracted

    def all_seqs(self) -> list[Sequence]:
        return list(self.running) + list(self.waiting)


def prefill_len(seq: Sequence) -> int:
    """Tokens a prefill feeds: the prompt, or everything but the last token after a retract."""
    return seq.num_tokens if seq.needs_sample_at_prefill else seq.num_tokens - 1
