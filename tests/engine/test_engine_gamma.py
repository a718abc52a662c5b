"""The auto speculation policy: γ_t chosen per step (bebop_spec/engine/gamma.py).

The controller is pure Python, so its decisions are tested on scripted timings; the
engine-side bookkeeping it relies on (plain steps between drafting steps, the head's
catch-up after a long plain run) is tested against a fresh engine on the same context.
Exactness of sampling under `auto` is in tests/engine/test_engine_exactness.py.
"""

from __future__ import annotations

import pytest
import torch

from bebop_spec import SamplingParams
from bebop_spec.engine import runner as runner_module
from bebop_spec.engine.config import SPEC_POLICIES, EngineConfig, SpecPolicy
from bebop_spec.engine.gamma import GammaController, bucket, expected_tokens, monotone
from bebop_spec.engine.llm_engine import LLMEngine


def _drive(ctl: GammaController, rows: int, cost, accept, steps: int) -> list[int]:
    """Run `steps` decisions; cost(γ) -> seconds, accept(γ) -> accepted drafts per row."""
    chosen = []
    for _ in range(steps):
        g = ctl.choose(rows)
        chosen.append(g)
        ctl.observe_cost(rows, g, cost(g))
        if g:
            ctl.observe_acceptance([accept(g)] * rows, g)
    return chosen


def test_expected_tokens_and_buckets():
    """tokens(γ) = 1 + α1 + α1α2 + …; buckets are the next power of two."""
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1.875)
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]


def test_monotone_pools_adjacent_violators():
    """The weighted non-decreasing fit: a violating pair is replaced by its weighted mean;
    an already sorted sequence is unchanged."""
    assert monotone([1.3, 1.2, 1.5], [1, 1, 1]) == pytest.approx([1.25, 1.25, 1.5])
    assert monotone([1.4, 1.1, 1.2], [1, 3, 1]) == pytest.approx([1.175, 1.175, 1.2])
    assert monotone([1.0, 1.1, 1.3], [5, 1, 2]) == [1.0, 1.1, 1.3]


def _noisy_neighbour_run(seed: int, steps: int = 400) -> list[int]:
    """γ_t at batch 1 when each step runs 1.5-3x slow with probability 0.2, whatever its γ;
    per-position acceptance 0.7, drafts at 5 % of a step."""
    gen = torch.Generator().manual_seed(seed)

    def rand() -> float:
        return float(torch.rand((), generator=gen))

    def cost(g: int) -> float:
        return (1.0 + 0.05 * g) * (1.5 + 1.5 * rand() if rand() < 0.2 else 1.0)

    def accept(g: int) -> int:
        return next((j for j in range(g) if rand() > 0.7), g)

    return _drive(GammaController(gamma_max=3), 1, cost, accept, steps)


def test_noisy_timings_do_not_flip_the_choice():
    """A noisy neighbour (`_noisy_neighbour_run`): γ_max wins by > 10 % over any other γ;
    low-quantile estimates (noise only slows a step) and re-timing a γ that wins at its
    fastest timings keep the policy there on > 90 % of the last 200 of 400 steps, for each
    of 6 seeds (averaging single timings let one slow step bury γ_max for hundreds)."""
    for seed in range(6):
        assert _noisy_neighbour_run(seed)[-200:].count(3) > 180, seed


def test_plain_baseline_is_retimed_while_drafting_wins():
    """Drafting wins throughout (acceptance 0.7 per position, drafts 10 % of a step) while
    every step's cost grows with the context (+60 % over 1,200 steps): the plain baseline is
    re-timed (2-step bursts, the first untimed, every 100 steps: the lead is wide), so its
    estimate follows the growth to within the ~300 steps its window spans
    (> 1.4 at the end, where the step costs 1.6 and the first timings said 1.0), γ_max keeps
    > 90 % of the last 400 steps, and plain steps stay < 4 % after warm-up."""
    ctl = GammaController(gamma_max=3)
    gen = torch.Generator().manual_seed(0)
    clock = iter(range(10**6))

    def accept(g: int) -> int:
        return next((j for j in range(g) if float(torch.rand((), generator=gen)) > 0.7), g)

    chosen = _drive(ctl, 4, cost=lambda g: (1.0 + 0.1 * g) * (1 + next(clock) / 2000),
                    accept=accept, steps=1200)  # fmt: skip
    assert ctl.plain_cost(4) > 1.4
    assert chosen[-400:].count(3) > 360
    assert chosen[20:].count(0) / len(chosen[20:]) < 0.04


def test_timings_after_a_prefill_or_a_switch_are_not_used():
    """The 4 decode steps after a prefill (measured: up to 2x a settled step on the demo
    model) and the first step after a change of γ (~1.1x) run on caches another shape left:
    they enter no estimate, and neither does the first timing of a shape (warm-up)."""
    ctl = GammaController(gamma_max=2)
    ctl.observe_prefill()
    for seconds in (9.0, 9.0, 9.0, 9.0, 5.0, 1.0, 1.0, 1.0):  # 4 settling, 1 warm-up, 3 kept
        ctl.observe_cost(1, 0, seconds)
    assert ctl.plain_cost(1) == 1.0 and ctl.plain[1].samples == 4
    ctl.observe_cost(1, 1, 7.0)  # the step after switching to γ = 1
    assert (1, 1) not in ctl.ratios
    ctl.observe_cost(1, 1, 7.0)
    assert ctl.ratios[(1, 1)].samples == 1


def test_never_drafts_when_drafting_cannot_pay():
    """Zero acceptance and drafting that costs: after the γ ≤ 1 timings the policy settles on
    γ = 0, never tries γ ≥ 2 (it could not win even with free extra drafts), and re-probes
    only every `reprobe_every` steps (≤ 1 / 50 of steps after warm-up)."""
    ctl = GammaController(gamma_max=3)
    chosen = _drive(ctl, 16, cost=lambda g: 1.0 + 0.4 * g, accept=lambda g: 0, steps=500)
    assert max(chosen) == 1
    tail = chosen[10:]
    assert tail.count(0) / len(tail) > 0.97


def test_losing_reprobes_back_off():
    """Drafting that never pays: each re-probe that leaves γ = 0 the best doubles the
    bucket's interval (50, 100, 200, … ≤ 800 steps), so over 3,000 steps at most 20 drafting
    steps run (γ = 1 explored in 5: one after the switch, one warm-up, 3 kept; then ~7
    probes of 2 steps, the first untimed) instead of 120 at a fixed interval."""
    ctl = GammaController(gamma_max=3)
    chosen = _drive(ctl, 4, cost=lambda g: 1.0 + 0.5 * g, accept=lambda g: 0, steps=3000)
    assert sum(1 for g in chosen if g) <= 20


def test_a_larger_batch_is_not_explored_when_a_smaller_one_lost():
    """The verify/plain cost ratio grows with the batch: once batch 1 measured drafting at
    1.4× a plain step with acceptance ≈ 0, a later batch of 16 never times γ = 1 (it could
    not win even at batch 1's ratio)."""
    ctl = GammaController(gamma_max=3)
    _drive(ctl, 1, cost=lambda g: 1.0 + 0.4 * g, accept=lambda g: 0, steps=20)
    later = _drive(ctl, 16, cost=lambda g: 2.0 + 2.0 * g, accept=lambda g: 0, steps=45)
    assert max(later) == 0


def test_drafts_the_most_when_acceptance_is_high():
    """Acceptance 0.9 per position and cheap drafts: the policy settles on γ_max."""
    ctl = GammaController(gamma_max=3)
    chosen = _drive(ctl, 1, cost=lambda g: 1.0 + 0.1 * g,
                    accept=lambda g: g if torch.rand(()) < 0.9 else 0, steps=300)  # fmt: skip
    assert chosen[-100:].count(3) > 90


def test_follows_a_drop_in_acceptance():
    """A head that stops being accepted (entropy drift): within ~200 steps the policy moves
    from drafting to plain steps, because acceptance counts decay."""
    ctl = GammaController(gamma_max=3)
    cost = lambda g: 1.0 + 0.15 * g  # noqa: E731
    _drive(ctl, 4, cost, accept=lambda g: g, steps=100)
    assert _drive(ctl, 4, cost, accept=lambda g: g, steps=20).count(3) >= 15
    late = _drive(ctl, 4, cost, accept=lambda g: 0, steps=300)
    assert late[-50:].count(0) >= 45


def test_a_shrinking_batch_does_not_make_drafting_look_cheap():
    """Requests finish, so a bucket's rows shrink (16 → 9) while plain steps keep being timed at
    the current rows: a drafting step (1.9× a plain one, acceptance 0.3: tokens 1.3) must be
    compared with a plain step at the same rows, so γ = 0 wins throughout (> 90 % of steps)."""
    ctl = GammaController(gamma_max=2)
    chosen = []
    for step in range(400):
        rows = 16 - min(7, step // 40)
        g = ctl.choose(rows)
        chosen.append(g)
        ctl.observe_cost(rows, g, 0.1 * rows * (1 + 0.9 * g))
        if g:
            ctl.observe_acceptance([int(i % 10 < 3) for i in range(rows)], g)
    assert chosen[20:].count(0) / len(chosen[20:]) > 0.9


def test_decision_is_a_function_of_history_only():
    """Two controllers fed the same observations make the same choices (no hidden state or
    randomness): γ_t cannot depend on the current step's random draws."""
    a, b = GammaController(gamma_max=2), GammaController(gamma_max=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        ga, gb = a.choose(8), b.choose(8)
        assert ga == gb
        t, acc = float(torch.rand((), generator=gen)), int(torch.randint(0, 3, (), generator=gen))
        for ctl in (a, b):
            ctl.observe_cost(8, ga, t + ga)
            if ga:
                ctl.observe_acceptance([min(acc, ga)] * 8, ga)


class _Scripted:
    """A stand-in policy that plays a fixed γ sequence (then keeps the last)."""

    def __init__(self, gammas: list[int]) -> None:
        self.gammas = gammas

    def choose(self, rows: int) -> int:
        return self.gammas.pop(0) if len(self.gammas) > 1 else self.gammas[0]

    def observe_cost(self, *args) -> None: ...

    def observe_acceptance(self, *args) -> None: ...

    def observe_prefill(self) -> None: ...


def _engine(model, gamma: int = 2) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), mtp=str(model / "mtp"), draft_mode="rs",
                                  num_speculative_tokens=gamma, spec_policy="fixed",
                                  max_num_seqs=4))  # fmt: skip


def _first_draft_q(engine: LLMEngine, prompt: list[int], gammas: list[int]) -> tuple:
    """Greedy-generate under the scripted γ's; return (context, q of the last drafting step)."""
    engine.gamma_policy = _Scripted(gammas)
    captured = {}
    draft = engine.runner._draft

    def spy(seqs, *rest):
        drafts, q = draft(seqs, *rest)
        captured["ctx"], captured["q"] = list(seqs[0].all_ids), q[0].clone()
        return drafts, q

    engine.runner._draft = spy
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=len(gammas) + 1,
                                                   ignore_eos=True))  # fmt: skip
    while engine.has_unfinished():
        engine.step()
    return captured["ctx"], captured["q"]


def test_head_catch_up_after_plain_steps_equals_fresh_prefill(tiny_model, one_thread,
                                                              monkeypatch):  # fmt: skip
    """After MAX_PENDING + 8 plain steps (the head's catch-up runs once in between; the bound
    is lowered to 24 so that the run fits the tiny model's context), the next drafting step's
    q equals the q a fresh engine drafts after prefilling the same context: the head's cache
    holds exactly the pairs (h_j, x_{j+1}) it would have had (1e-5)."""
    monkeypatch.setattr(runner_module, "MAX_PENDING", 24)
    prompt = [3, 1, 4, 1, 5]
    plain = runner_module.MAX_PENDING + 8
    ctx, q = _first_draft_q(_engine(tiny_model), prompt, [0] * plain + [2])
    assert len(ctx) == len(prompt) + plain + 1
    ref_ctx, ref_q = _first_draft_q(_engine(tiny_model), ctx[:-1], [2])
    assert ref_ctx == ctx
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)


def test_auto_greedy_equals_plain(tiny_model, one_thread):
    """Greedy outputs under `auto` (any mix of γ_t) equal plain decoding token for token."""
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    auto = LLMEngine(EngineConfig(model=str(tiny_model), mtp=str(tiny_model / "mtp"),
                                  max_num_seqs=4))  # fmt: skip
    plain = LLMEngine(EngineConfig(model=str(tiny_model), draft_mode=None, max_num_seqs=4))
    outs = {}
    for name, eng in (("auto", auto), ("plain", plain)):
        for i, p in enumerate(([1, 2, 3], [7, 7], [5, 9, 11, 2])):
            eng.add_request(f"{name}{i}", p, params)
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id[len(name) :]] = o.outputs[0].token_ids
        outs[name] = done
    assert outs["auto"] == outs["plain"]
    assert auto.gamma_policy is not None and sum(auto.gamma_policy.chosen) > 0


def test_spec_policy_is_one_vocabulary():
    """The policy names the CLI offers are SpecPolicy's values; EngineConfig turns the
    string it is given into the member (equal to that string) and refuses any other."""
    assert SPEC_POLICIES == ("auto", "fixed") == tuple(SpecPolicy)
    config = EngineConfig(model="x", spec_policy="fixed")
    assert config.spec_policy is SpecPolicy.FIXED and config.spec_policy == "fixed"
    assert EngineConfig(model="x").spec_policy is SpecPolicy.AUTO
    with pytest.raises(ValueError, match="must be auto or fixed"):
        EngineConfig(model="x", spec_policy="greedy")
