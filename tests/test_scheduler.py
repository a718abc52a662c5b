"""Scheduler invariants on plain Python objects (no tensors run)."""

import pytest
import torch

from bebop_spec.engine.scheduler import Scheduler
from bebop_spec.engine.sequence import SeqStatus, Sequence
from bebop_spec.errors import EngineOverloaded
from bebop_spec.sampling_params import SamplingParams


def _seq(i: int, n_prompt: int = 4) -> Sequence:
    return Sequence(i, f"r{i}", 0, list(range(n_prompt)), SamplingParams(), torch.Generator())


def test_admits_up_to_free_slots_then_decodes():
    """New requests are prefilled while slots are free; a full engine decodes what runs."""
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=100, max_waiting=10)
    s.add([_seq(0), _seq(1), _seq(2)])
    b = s.schedule()
    assert b.kind == "prefill" and [q.seq_id for q in b.seqs] == [0, 1]
    assert {q.slot for q in b.seqs} == {0, 1} and s.num_waiting == 1
    b = s.schedule()
    assert b.kind == "decode" and len(b.seqs) == 2
    b.seqs[0].finish("stop")
    s.release(b.seqs[0])
    b = s.schedule()
    assert b.kind == "prefill" and b.seqs[0].seq_id == 2 and b.seqs[0].slot is not None


def test_token_budget_splits_prefill_but_always_admits_one():
    """The prefill token budget bounds a batch; a lone long prompt is still admitted."""
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=10, max_waiting=10)
    s.add([_seq(0, 8), _seq(1, 8), _seq(2, 30)])
    assert [q.seq_id for q in s.schedule().seqs] == [0]
    assert [q.seq_id for q in s.schedule().seqs] == [1]
    assert [q.seq_id for q in s.schedule().seqs] == [2]


def test_waiting_bound_refuses_whole_request():
    """A request whose samples do not all fit in the waiting queue is refused, none queued."""
    s = Scheduler(max_num_seqs=1, max_num_batched_tokens=100, max_waiting=2)
    s.add([_seq(0)])
    with pytest.raises(EngineOverloaded):
        s.add([_seq(1), _seq(2)])
    assert s.num_waiting == 1


def test_retract_returns_slots_and_requeues_in_order():
    """Retract frees every slot and puts running sequences back at the queue's front."""
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=100, max_waiting=10)
    s.add([_seq(0), _seq(1), _seq(2)])
    s.schedule()
    s.retract_all()
    assert sorted(s.free_slots) == [0, 1]
    assert [q.seq_id for q in s.waiting] == [0, 1, 2]
    assert all(q.status is SeqStatus.WAITING and q.slot is None for q in s.waiting)
