"""Chain verification (bebop_spec.spec.verify) and counters (bebop_spec.spec.stats).

The distributional tests run ~200k chains in one vectorised call, with fixed torch seeds,
so each is deterministic; thresholds are stated in each docstring.
Run: python -m pytest -q tests/spec/test_spec_verify.py
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from bebop_spec.sampling_params import SamplingParams
from bebop_spec.spec import (
    SamplingTensors,
    SpecStats,
    acceptance_rs,
    acceptance_to,
    draft_tokens,
    entropy,
    expected_accepted,
    process_logits,
    speedup_bound,
    verify_chain,
)

U_MAX = 1.0 - 2.0**-24  # the largest value torch.rand returns in float32
N = 200_000


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of tokens[n] to probs[V]; tokens of zero probability must not occur."""
    counts = torch.bincount(tokens, minlength=probs.shape[-1]).double()
    assert counts[probs == 0].sum() == 0, "sampled a zero-probability token"
    pos = probs > 0
    expected = probs[pos].double() / probs[pos].double().sum() * counts.sum()
    return stats.chisquare(counts[pos].numpy(), expected.numpy()).pvalue


def run_chains(p: torch.Tensor, q: torch.Tensor, mode: str, n: int, gen: torch.Generator):
    """n independent chains against fixed p[γ+1,V], q[γ,V]; drafts made by draft_tokens."""
    gamma, vocab = q.shape
    qb, pb = q.expand(n, gamma, vocab), p.expand(n, gamma + 1, vocab)
    u_draft = torch.rand(n, gamma, generator=gen)
    drafts = torch.stack([draft_tokens(qb[:, i], u_draft[:, i], mode) for i in range(gamma)], 1)
    u_accept, u_emit = torch.rand(n, gamma, generator=gen), torch.rand(n, generator=gen)
    return verify_chain(drafts, qb, pb, u_accept, u_emit, mode)


def dense_pair(gen: torch.Generator, gamma: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random p and a deliberately different q (q = 0.6 p + 0.4 noise, one p-token zeroed in q)."""
    p = torch.softmax(1.5 * torch.randn(gamma + 1, vocab, generator=gen), -1)
    noise = torch.softmax(1.5 * torch.randn(gamma, vocab, generator=gen), -1)
    q = 0.6 * p[:gamma] + 0.4 * noise
    q[:, 0] = 0.0
    return p, q / q.sum(-1, keepdim=True)


def processed_pair(gen: torch.Generator, gamma: int, vocab: int):
    """p and q from process_logits with temperature + top-k + top-p: both have zeros, on
    different supports, so p(x) = 0 drafts and q = 0 targets both occur."""
    st = SamplingTensors.from_params([SamplingParams(temperature=0.9, top_k=5, top_p=0.9)])
    logits_p = 2.0 * torch.randn(1, gamma + 1, vocab, generator=gen)
    logits_q = logits_p[:, :gamma] + 1.2 * torch.randn(1, gamma, vocab, generator=gen)
    p, q = process_logits(logits_p, st)[0], process_logits(logits_q, st)[0]
    assert ((q > 0) & (p[:gamma] == 0)).any() and ((p[:gamma] > 0) & (q == 0)).any()
    return p, q


@pytest.mark.parametrize("mode", ["rs", "to"])
@pytest.mark.parametrize("make_pair", [dense_pair, processed_pair])
def test_emitted_tokens_follow_p_and_mean_accepted_matches_formula(mode, make_pair) -> None:
    """Invariants (DESIGN §2): (a) the token at every reached chain position i is distributed
    as p_i, drafts accepted or not; (b) the mean accepted count equals
    expected_accepted(α) with α from acceptance_rs / acceptance_to.
    200,000 chains, γ = 3, V = 10. (a) chi-square goodness of fit at each position (each
    reached >= 2,000 times), p-value > 1e-3, zero-probability tokens never emitted; (b) z-test,
    |mean − E[A]| < 5 standard errors, and the same for each P(num_accepted > j) = Π_{i≤j} α_i.
    """
    gen, gamma, vocab = torch.Generator().manual_seed(4), 3, 10
    p, q = make_pair(gen, gamma, vocab)
    num_accepted, tokens = run_chains(p, q, mode, N, gen)

    for i in range(gamma + 1):
        at_i = tokens[:, i][tokens[:, i] >= 0]
        assert at_i.numel() >= 2000, "seed chosen so every position is reached often"
        assert chi_square_pvalue(at_i, p[i]) > 1e-3, (mode, i)

    acceptance = acceptance_rs if mode == "rs" else acceptance_to
    alpha = acceptance(p[:gamma].double(), q.double())
    accepted = num_accepted.double()
    stderr = accepted.std().item() / math.sqrt(N)
    assert abs(accepted.mean().item() - expected_accepted(alpha).item()) < 5 * stderr + 1e-9
    for j, reach in enumerate(alpha.cumprod(0).tolist()):
        frac = (num_accepted > j).double().mean().item()
        assert abs(frac - reach) < 5 * math.sqrt(reach * (1 - reach) / N) + 1e-9, (j, frac, reach)


@pytest.mark.parametrize("mode", ["rs", "to"])
def test_bigram_stream_equals_autoregressive_sampling(mode: str) -> None:
    """Invariant: a whole token stream produced by repeated draft + verify steps, where p and
    q depend on the previous token (bigram tables with zeros in different cells), has the
    same joint law as sampling p token by token. 100,000 streams of 3 tokens, γ = 2, V = 4:
    chi-square over the 64 joint cells vs Π p(t_k | t_{k-1}), p-value > 1e-3; impossible
    sequences never occur. This exercises the chaining of drafts, not just one position."""
    gen, gamma, length, n = torch.Generator().manual_seed(4), 2, 3, 100_000
    P = torch.tensor(
        [[0.5, 0.3, 0.2, 0.0], [0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.7, 0.1, 0.2]]
    )
    Q = torch.tensor(
        [[0.3, 0.1, 0.1, 0.5], [0.4, 0.4, 0.2, 0.0], [0.7, 0.1, 0.0, 0.2], [0.2, 0.2, 0.3, 0.3]]
    )
    out = torch.full((n, length + gamma + 1), -1, dtype=torch.long)
    filled = torch.zeros(n, dtype=torch.long)
    last = torch.zeros(n, dtype=torch.long)  # the stream starts after token 0
    rows = torch.arange(n)
    while (filled < length).any():
        contexts, drafts = [last], []
        for _ in range(gamma):
            x = draft_tokens(Q[contexts[-1]], torch.rand(n, generator=gen), mode)
            drafts.append(x)
            contexts.append(x)
        q = torch.stack([Q[c] for c in contexts[:-1]], 1)
        p = torch.stack([P[c] for c in contexts], 1)
        u_accept, u_emit = torch.rand(n, gamma, generator=gen), torch.rand(n, generator=gen)
        num_accepted, tokens = verify_chain(torch.stack(drafts, 1), q, p, u_accept, u_emit, mode)
        active = filled < length
        for j in range(gamma + 1):
            write = active & (j <= num_accepted)
            out[rows[write], filled[write] + j] = tokens[write, j]
        last = torch.where(active, tokens[rows, num_accepted], last)
        filled = torch.where(active, filled + num_accepted + 1, filled)

    t = out[:, :length]
    joint = P[0][:, None, None] * P[:, :, None] * P[None, :, :]  # p(t0|0) p(t1|t0) p(t2|t1)
    cells = t[:, 0] * 16 + t[:, 1] * 4 + t[:, 2]
    assert chi_square_pvalue(cells, joint.reshape(-1)) > 1e-3


@pytest.mark.parametrize("mode", ["rs", "to"])
def test_greedy_rows_accept_iff_argmax_and_emit_argmax(mode: str) -> None:
    """Invariant: with p from a temperature-0 request (exact one-hot), the chain accepts x_i
    iff x_i == argmax p_i and emits argmax p at the stop position, for every uniform
    (including 0 and U_MAX) and any q, including q one-hot at argmax p while x differs."""
    gen, n, gamma, vocab = torch.Generator().manual_seed(5), 4000, 4, 5
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * n)
    p = process_logits(torch.randn(n, gamma + 1, vocab, generator=gen), greedy)
    target = p.argmax(-1)
    q = torch.softmax(torch.randn(n, gamma, vocab, generator=gen), -1)
    q[: n // 4] = torch.nn.functional.one_hot(target[: n // 4, :gamma], vocab).float()
    wrong = torch.randint(0, vocab, (n, gamma), generator=gen)
    drafts = torch.where(torch.rand(n, gamma, generator=gen) < 0.7, target[:, :gamma], wrong)
    u_accept = torch.rand(n, gamma, generator=gen)
    u_accept[::3], u_accept[1::3] = 0.0, U_MAX
    u_emit = torch.rand(n, generator=gen)
    u_emit[::2] = U_MAX

    num_accepted, tokens = verify_chain(drafts, q, p, u_accept, u_emit, mode)
    matches = (drafts == target[:, :gamma]).long().cumprod(1).sum(1)
    assert torch.equal(num_accepted, matches)
    rows = torch.arange(n)
    assert torch.equal(tokens[rows, num_accepted], target[rows, num_accepted])


def test_rs_with_p_equal_q_always_accepts() -> None:
    """Invariant: if p_i == q_i then min(1, p/q) = 1: every draft is accepted for every
    uniform below 1 (U_MAX in float32, 1 − 2⁻⁵³ in float64), and the bonus has p_{γ+1} > 0."""
    gen, n, gamma, vocab = torch.Generator().manual_seed(6), 1000, 3, 7
    st = SamplingTensors.from_params([SamplingParams(top_k=4)] * n)
    p = process_logits(torch.randn(n, gamma + 1, vocab, generator=gen), st)
    q = p[:, :gamma].clone()
    drafts = draft_tokens(q, torch.rand(n, gamma, generator=gen), "rs")
    for u in (
        torch.full((n, gamma), U_MAX),
        torch.full((n, gamma), 1 - 2.0**-53, dtype=torch.float64),
    ):
        num_accepted, tokens = verify_chain(drafts, q, p, u, torch.rand(n, generator=gen), "rs")
        assert (num_accepted == gamma).all()
        assert torch.equal(tokens[:, :gamma], drafts)
        assert (p[:, gamma].gather(1, tokens[:, gamma:]) > 0).all()


def test_zero_target_probability_is_certain_rejection() -> None:
    """Invariant: a draft with p(x) = 0 is rejected even at u = 0, in both modes; the emitted
    token then has p > 0. A draft with q(x) = 0 (never made by draft_tokens) yields no nan:
    accepted iff p(x) > 0, and with p == q there the empty residual falls back to p."""
    p = torch.tensor([[[0.0, 0.6, 0.4], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[0.5, 0.5, 0.0]]])
    zero_u = torch.zeros(1, 1)
    for mode in ("rs", "to"):
        num_accepted, tokens = verify_chain(torch.tensor([[0]]), q, p, zero_u, torch.rand(1), mode)
        assert num_accepted.item() == 0 and tokens[0, 0].item() in (1, 2) and tokens[0, 1] == -1
    # q(x) = 0 but p(x) > 0: min(1, p/0) = 1, accepted.
    num_accepted, _ = verify_chain(torch.tensor([[2]]), q, p, torch.full((1, 1), U_MAX),
                                   torch.rand(1), "rs")  # fmt: skip
    assert num_accepted.item() == 1
    # q(x) = p(x) = 0 with p == q: rejected, residual max(p − q, 0) is empty → sample from p.
    same = torch.tensor([[[0.0, 0.6, 0.4], [0.2, 0.3, 0.5]]])
    for u_emit in (0.0, 0.5, U_MAX):
        num_accepted, tokens = verify_chain(
            torch.tensor([[0]]), same[:, :1], same, zero_u, torch.tensor([u_emit]), "rs"
        )
        assert num_accepted.item() == 0 and tokens[0, 0].item() in (1, 2)


def test_residual_and_layout_on_a_hand_worked_chain() -> None:
    """Invariant: the exact rule on numbers worked by hand. Row 0: p_1 = q_1 accepted, then
    x_2 = 0 with p = 0.5, q = 1 and u = 0.7 > 0.5 rejected; max(p − q, 0) = [0, 0.5, 0] so
    token 1 is emitted whatever u_emit. Row 1: both accepted, bonus from p_3 = one-hot(2).
    TO on row 0 with u_1 = 0.5 < p_1(1) = 0.8: accepted; then u_2 = 0.7 > p_2(0) = 0.5
    rejects and p_2 without x_2 is [0, 0.5, 0] → token 1 again."""
    p = torch.tensor(
        [
            [[0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],
            [[0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    q = torch.tensor([[[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]], [[0.2, 0.8, 0.0], [0.5, 0.5, 0.0]]])
    drafts = torch.tensor([[1, 0], [1, 1]])
    u_accept = torch.tensor([[0.9, 0.7], [0.9, 0.99]])
    for u_emit in (0.0, 0.5, U_MAX):
        num_accepted, tokens = verify_chain(drafts, q, p, u_accept, torch.full((2,), u_emit), "rs")
        assert num_accepted.tolist() == [1, 2]
        assert tokens.tolist() == [[1, 1, -1], [1, 1, 2]]
    u_to = torch.tensor([[0.5, 0.7]])
    num_accepted, tokens = verify_chain(drafts[:1], None, p[:1], u_to, torch.zeros(1), "to")
    assert num_accepted.tolist() == [1] and tokens.tolist() == [[1, 1, -1]]


def test_gamma_zero_and_bad_arguments() -> None:
    """Invariant: γ = 0 is plain sampling from p_1; unknown modes and mis-shaped p raise."""
    p = torch.tensor([[[0.0, 1.0]]])
    num_accepted, tokens = verify_chain(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 2), p, torch.zeros(1, 0),
        torch.rand(1), "rs",
    )  # fmt: skip
    assert num_accepted.tolist() == [0] and tokens.tolist() == [[1]]
    with pytest.raises(ValueError, match="draft mode"):
        draft_tokens(p[0], torch.rand(1), "greedy")
    with pytest.raises(ValueError, match=r"\[B, γ\+1, V\]"):
        verify_chain(torch.zeros(1, 2, dtype=torch.long), None, p, torch.zeros(1, 2),
                     torch.rand(1), "to")  # fmt: skip


def test_analytic_helpers() -> None:
    """Invariant: α_RS = Σ min(p, q) = 1 − TV; α_TO = p(argmax q); E[A] = Σ_j Π_{i≤j} α_i;
    speed bound (1 + E[A]) / (1 + γc) — checked on hand-computed numbers."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    assert acceptance_rs(p, q).tolist() == pytest.approx([0.6, 1.0])
    tv = 0.5 * (p - q).abs().sum(-1)
    torch.testing.assert_close(acceptance_rs(p, q), 1 - tv)
    assert acceptance_to(p, q).tolist() == pytest.approx([0.3, 0.8])
    alpha = torch.tensor([0.9, 0.8, 0.5])
    assert expected_accepted(alpha).item() == pytest.approx(0.9 + 0.72 + 0.36)
    assert speedup_bound(1.98, 3, 0.1) == pytest.approx(2.98 / 1.3)


def test_entropy_in_nats() -> None:
    """Invariant: H(uniform over V) = log V, H(one-hot) = 0, zeros contribute 0 (no nan)."""
    probs = torch.tensor([[0.25] * 4, [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert entropy(probs).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])
    assert entropy(torch.full((2, 3, 5), 0.2)).shape == (2, 3)


def test_spec_counters() -> None:
    """Invariant: counters follow vLLM's definitions — acceptance rate = accepted / drafted,
    mean accepted length = 1 + accepted / drafts, accepted_per_pos[j] = #(num_accepted > j);
    merge adds (γ may differ) and leaves its inputs unchanged; out-of-range counts raise."""
    c = SpecStats()
    assert c.acceptance_rate == 0.0 and c.mean_accepted_length == 0.0
    c.add(torch.tensor([0, 3, 1, 2]), gamma=3)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (4, 12, 6)
    assert c.accepted_per_pos == [3, 2, 1]
    assert c.acceptance_rate == 0.5 and c.mean_accepted_length == 2.5
    assert c.acceptance_rate_per_pos == [0.75, 0.5, 0.25]
    d = SpecStats()
    d.add([4], gamma=4)
    m = c.merge(d)
    assert m.accepted_per_pos == [4, 3, 2, 1] and m.num_draft_tokens == 16
    assert c.accepted_per_pos == [3, 2, 1] and d.num_drafts == 1
    with pytest.raises(ValueError):
        c.add([4], gamma=3)
