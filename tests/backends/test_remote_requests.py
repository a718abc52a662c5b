"""The remote backends' request ledger (backends/remote_requests.py), without any engine."""

from __future__ import annotations

from bebop_spec.backends.remote_requests import RequestLedger, new_tokens
from bebop_spec.engine.outputs import CompletionOutput, RequestOutput, SpecStats


def test_ledger_counts_requests_and_sums_spec_totals():
    """Invariant: a request is waiting until its first output, running until it finishes,
    then gone; the totals are the sum of the finished requests' counters, per position padded
    to the longest γ seen; each increment reaches the observers as one StepStats."""
    ledger, seen = RequestLedger("rs"), []
    ledger.observers.append(seen.append)
    ledger.track("a", started=False, finished=False)
    ledger.track("b", started=False, finished=False)
    ledger.track("a", started=True, finished=False)
    assert ("a" in ledger, "c" in ledger) == (True, False)
    assert (ledger.running, ledger.waiting, ledger.ids()) == ({"a"}, {"b"}, ["a", "b"])
    ledger.observe(3, SpecStats(2, 4, 3, [2, 1]))
    ledger.observe(1, None)
    ledger.observe(2, SpecStats(1, 3, 3, [1, 1, 1]))
    ledger.track("a", started=True, finished=True)
    ledger.track("b", started=True, finished=True)
    assert ledger.ids() == []
    t = ledger.spec_totals
    assert (t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens) == (3, 7, 6)
    assert t.accepted_per_pos == [3, 2, 1]
    assert [s.num_generated_tokens for s in seen] == [3, 1, 2]
    assert [s.num_accepted_tokens for s in seen] == [3, 0, 3]
    assert seen[0].draft_mode == "rs" and (seen[0].num_running, seen[0].num_waiting) == (1, 1)


def test_new_tokens_counts_the_increment_over_samples():
    """Invariant: cumulative outputs -> tokens added since the previous output, all samples."""

    def out(*lengths: int) -> RequestOutput:
        samples = [CompletionOutput(i, list(range(n))) for i, n in enumerate(lengths)]
        return RequestOutput("r", [0], samples)

    assert new_tokens(None, out(2, 1)) == 3
    assert new_tokens(out(2, 1), out(4, 3)) == 4
