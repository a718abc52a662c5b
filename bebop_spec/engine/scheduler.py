"""Continuous-batching scheduler: plain Python objects, no tensors (unit-testable alone).

Each step is either a prefill of newly admitted sequences or a decode step over everything
running (nano-vllm's policy). A waiting sequence is admitted when a running place
(max_num_seqs) and the KV blocks for its prefill are free (engine/block_manager.py). Before a
decode step every running sequence gets blocks for the positions the step may write (1, or
γ_max + 1 when speculating); when blocks run out the most recently admitted sequences are
preempted: their blocks are freed and they go back to the front of the queue, to be
recomputed by a later prefill (their sampled tokens and random state are kept, so a
preempted request's output is what it would have been).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from bebop_spec.engine.block_manager import BlockManager
from bebop_spec.engine.sequence import SeqStatus, Sequence
from bebop_spec.errors import EngineOverloaded


@dataclass
class Batch:
    kind: str  # "prefill" | "decode"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting: int, lookahead: int = 0) -> None:  # fmt: skip
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.lookahead = lookahead  # positions past the next one a decode step may write
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

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
        admitted = self._admit()
        if admitted:
            self.running.extend(admitted)
            return Batch("prefill", admitted)
        if self.running:
            return Batch("decode", self._reserve_decode())
        return None

    def _admit(self) -> list[Sequence]:
        """Waiting sequences whose prefill fits the token budget and the free blocks. While
        others run, one block per running sequence stays free for their next decode step."""
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        self.blocks.begin_batch()
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            cost = seq.num_prefill_tokens
            reserve = len(self.running) + len(admitted)
            if admitted and cost > budget:
                break
            covered = self.blocks.allocate(seq, reserve)
            if covered is None:
                break
            self.waiting.popleft()
            seq.num_cached = seq.mtp_cached = covered
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            budget -= cost - seq.num_cached
        return admitted

    def _reserve_decode(self) -> list[Sequence]:
        """Blocks for this step's writes, oldest sequence first; preempt the newest when short."""
        batch: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            need = seq.num_cached + self.lookahead + 1
            while not self.blocks.can_append(seq, need) and queue:
                self._preempt(queue.pop())
            if self.blocks.can_append(seq, need):
                self.blocks.append(seq, need)
                batch.append(seq)
            else:  # nothing newer left to preempt: this one waits (the oldest always fits)
                self._preempt(seq)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._requeue(seq)
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.reset_cache_state()
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence from the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def retract_all(self) -> list[Sequence]:
        """Move running sequences back to the front of the queue; their K/V will be recomputed."""
        retracted = list(self.running)
        self.running.clear()
        for seq in reversed(retracted):
            self._requeue(seq)
        return retracted

    def all_seqs(self) -> list[Sequence]:
        return list(self.running) + list(self.waiting)
