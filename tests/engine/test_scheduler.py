"""Scheduler and block-manager invariants on plain Python objects (no tensors run)."""

import pytest
import torch

from bebop_spec.engine.block_manager import BlockManager
from bebop_spec.engine.scheduler import Scheduler
from bebop_spec.engine.sequence import SeqStatus, Sequence
from bebop_spec.errors import EngineOverloaded
from bebop_spec.sampling_params import SamplingParams


def _seq(i: int, n_prompt: int = 4, prompt: list[int] | None = None) -> Sequence:
    ids = list(range(n_prompt)) if prompt is None else prompt
    return Sequence(i, f"r{i}", 0, ids, SamplingParams(), torch.Generator())


def _sched(max_num_seqs=8, blocks=64, block_size=4, budget=100, waiting=10, lookahead=0):
    bm = BlockManager(blocks, block_size)
    return Scheduler(bm, max_num_seqs, budget, waiting, lookahead)


def _decode(s: Scheduler, tokens: int = 1) -> list[Sequence]:
    """One decode step that accepts `tokens` per row (what the runner's bookkeeping does)."""
    b = s.schedule()
    assert b.kind == "decode"
    for q in b.seqs:
        q.token_ids += [7] * tokens
        q.num_cached += tokens
    return b.seqs


def test_admits_up_to_max_num_seqs_then_decodes():
    """New requests are prefilled while places are free; a full engine decodes what runs."""
    s = _sched(max_num_seqs=2)
    s.add([_seq(0), _seq(1), _seq(2)])
    b = s.schedule()
    assert b.kind == "prefill" and [q.seq_id for q in b.seqs] == [0, 1]
    assert all(q.block_table for q in b.seqs) and s.num_waiting == 1
    for q in b.seqs:  # what the runner does after a prefill
        q.num_cached = q.num_prefill_tokens
        q.token_ids.append(9)
    b = s.schedule()
    assert b.kind == "decode" and len(b.seqs) == 2
    b.seqs[0].finish("stop")
    s.release(b.seqs[0])
    b = s.schedule()
    assert b.kind == "prefill" and b.seqs[0].seq_id == 2 and b.seqs[0].block_table


def test_token_budget_splits_prefill_but_always_admits_one():
    """The prefill token budget bounds a batch; a lone long prompt is still admitted."""
    s = _sched(budget=10)
    s.add([_seq(0, 8), _seq(1, 8), _seq(2, 30)])
    assert [q.seq_id for q in s.schedule().seqs] == [0]
    assert [q.seq_id for q in s.schedule().seqs] == [1]
    assert [q.seq_id for q in s.schedule().seqs] == [2]


def test_waiting_bound_refuses_whole_request():
    """A request whose samples do not all fit in the waiting queue is refused, none queued."""
    s = _sched(max_num_seqs=1, waiting=2)
    s.add([_seq(0)])
    with pytest.raises(EngineOverloaded):
        s.add([_seq(1), _seq(2)])
    assert s.num_waiting == 1


def test_retract_returns_blocks_and_requeues_in_order():
    """Retract frees every block and puts running sequences back at the queue's front."""
    s = _sched(max_num_seqs=2)
    s.add([_seq(0), _seq(1), _seq(2)])
    s.schedule()
    s.retract_all()
    assert s.blocks.num_free == s.blocks.num_blocks
    assert [q.seq_id for q in s.waiting] == [0, 1, 2]
    assert all(q.status is SeqStatus.WAITING and not q.block_table for q in s.waiting)


def test_admission_waits_for_blocks():
    """A prompt is admitted only when its blocks (plus one per running row) are free."""
    s = _sched(blocks=6, block_size=4)
    s.add([_seq(0, 12), _seq(1, prompt=list(range(50, 62)))])  # 3 blocks each; then 3 + 1
    assert [q.seq_id for q in s.schedule().seqs] == [0]
    assert s.schedule().kind == "decode" and s.num_waiting == 1


def test_decode_preempts_newest_and_keeps_tokens():
    """Out of blocks mid-generation, the newest sequence is preempted (blocks freed, tokens
    kept, back at the queue's front); the oldest always progresses; no block leaks."""
    s = _sched(blocks=5, block_size=4)
    a, b = _seq(0, 7), _seq(1, prompt=list(range(50, 57)))
    s.add([a, b])
    s.schedule()  # both admitted: 2 blocks each, 1 free
    for q in (a, b):
        q.num_cached = q.num_prefill_tokens
        q.token_ids.append(9)
    _decode(s)  # position 7 fits in block 2 of each
    s.schedule()  # position 8 needs a third block each: only one is free
    assert s.num_preemptions == 1 and b.status is SeqStatus.WAITING and not b.block_table
    assert b.token_ids == [9, 7] and list(s.waiting) == [b] and s.running == [a]
    assert len(a.block_table) == 3
    a.finish("stop")
    s.release(a)
    assert s.blocks.num_free == 5
    assert s.schedule().seqs == [b] and b.num_prefill_tokens == 8  # recompute all but the last


def test_prefix_blocks_shared_across_and_within_requests():
    """Equal prompts share their full blocks (those whose next token the prefill feeds); the
    tail block is private; counters record queried and hit tokens."""
    prompt = list(range(100, 111))  # 11 tokens, block 4: blocks 0, 1 shareable (8 + next ≤ 10)
    s = _sched(block_size=4)
    s.add([_seq(0, prompt=prompt), _seq(1, prompt=prompt)])
    a, b = s.schedule().seqs  # siblings in one prefill batch
    assert a.block_table[:2] == b.block_table[:2] and a.block_table[2] != b.block_table[2]
    assert (a.num_cached, b.num_cached) == (0, 8)
    assert s.blocks.stats.queried_tokens == 22 and s.blocks.stats.hit_tokens == 8
    other = _seq(2, prompt=prompt[:9] + [1, 2])  # same first two blocks and next token
    s.add([other])
    s.schedule()
    assert other.block_table[:2] == a.block_table[:2]
    diverged = _seq(3, prompt=prompt[:8] + [5, 6, 7])  # block 1's next token differs
    s.add([diverged])
    s.schedule()
    assert diverged.block_table[0] == a.block_table[0] and diverged.num_cached == 4


def test_invalidate_and_freed_blocks():
    """A freed block keeps serving hits until reused; invalidate() forgets every prefix."""
    prompt = list(range(9))
    s = _sched(block_size=4)
    s.add([_seq(0, prompt=prompt)])
    (a,) = s.schedule().seqs
    shared = a.block_table[:2]
    s.release(a)
    s.add([_seq(1, prompt=prompt)])
    (b,) = s.schedule().seqs
    assert b.block_table[:2] == shared and b.num_cached == 8
    s.release(b)
    s.blocks.invalidate()
    s.add([_seq(2, prompt=prompt)])
    (c,) = s.schedule().seqs
    assert c.num_cached == 0


def test_hash_collision_is_not_a_hit():
    """A cached hash whose stored tokens differ (a collision) is not reused."""
    bm = BlockManager(8, 4)
    a = _seq(0, prompt=list(range(9)))
    bm.allocate(a)
    h = next(iter(bm.cached))
    bm.block_key[bm.cached[h]] = (h, (0, 0, 0, 0, 0))  # same hash, other tokens
    assert bm.allocate(_seq(1, prompt=list(range(9)))) == 0


def test_rows_reading_blocks_filled_in_the_same_batch_run_after_them():
    """A short prompt (A) fills the blocks a longer one (B) then reuses in the same batch: B
    gets a higher prefill level, so the runner feeds A first although B is longer; the n
    samples of one prompt split into the full row and short tails, each group padded little."""
    from bebop_spec.engine.runner import prefill_groups

    s = _sched(block_size=4)
    a = _seq(0, prompt=list(range(10)))  # fills blocks 0, 1 (next tokens 4, 8 in the prompt)
    b = _seq(1, prompt=list(range(30)))  # reuses them, feeds 22 more tokens
    sibs = [_seq(i, prompt=list(range(50, 80))) for i in (2, 3, 4)]
    s.add([a, b, *sibs])
    batch = s.schedule().seqs
    assert (a.prefill_level, b.prefill_level) == (0, 1) and b.num_cached == 8
    assert [q.prefill_level for q in sibs] == [0, 1, 1]
    groups = prefill_groups(batch)
    order = [q.seq_id for g in groups for q in g]
    assert order.index(0) < order.index(1)
    assert groups == [[sibs[0]], [a], [b], [sibs[1], sibs[2]]]  # level 0: 30, 10; 1: 22, 2+2
    for g in groups:  # every row feeds at least half of its group's longest row
        lens = [q.num_prefill_tokens - q.num_cached for q in g]
        assert min(lens) >= 0.5 * max(lens) and len({q.prefill_level for q in g}) == 1
