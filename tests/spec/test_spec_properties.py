"""Property tests (hypothesis) of the spec/ tensor functions on adversarial small inputs:
zeros anywhere, subnormal probabilities, uniforms at 0 and just below 1, drafts the caller
should never make. Deterministic (derandomize) and no example database on disk.

Run: python -m pytest -q tests/spec/test_spec_properties.py
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bebop_spec.sampling_params import SamplingParams
from bebop_spec.spec import (
    SamplingTensors,
    draft_tokens,
    process_logits,
    sample_from_probs,
    verify_chain,
)

U_MAX = 1.0 - 2.0**-24  # the largest value torch.rand returns in float32
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

masses = st.sampled_from([0.0, 0.0, 1e-45, 1e-30, 1e-7, 0.5, 1.0]) | st.floats(0.0, 1.0, width=32)
uniforms = st.sampled_from([0.0, U_MAX, 0.5]) | st.floats(0.0, U_MAX, width=32)


def distributions(draw, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 rows over the last dim, each with at least one positive entry, normalised."""
    vocab = shape[-1]
    flat = torch.tensor(
        draw(
            st.lists(
                masses, min_size=vocab * _numel(shape[:-1]), max_size=vocab * _numel(shape[:-1])
            )
        ),
        dtype=torch.float32,
    ).reshape(shape)
    lift = draw(st.integers(0, vocab - 1))
    empty = flat.sum(-1) == 0
    flat[..., lift] = torch.where(empty, torch.ones_like(flat[..., lift]), flat[..., lift])
    return flat / flat.sum(-1, keepdim=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def draw_u(draw, shape: tuple[int, ...]) -> torch.Tensor:
    values = draw(st.lists(uniforms, min_size=_numel(shape), max_size=_numel(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@SETTINGS
@given(
    st.data(),
    st.integers(1, 3),
    st.integers(0, 4),
    st.integers(1, 6),
    st.sampled_from(["rs", "to"]),
)
def test_verify_chain_output_is_well_formed(data, batch, gamma, vocab, mode) -> None:
    """Invariants for any p, q (zeros, subnormals), any uniforms in [0, 1) and drafts either
    made by draft_tokens or arbitrary (q(x) = 0 allowed): 0 <= num_accepted <= γ; tokens =
    the first num_accepted drafts, then one emitted id in [0, V), then -1 padding; every
    token in the output has positive probability under its p_i (no nan, no impossible token)."""
    draw = data.draw
    p = distributions(draw, (batch, gamma + 1, vocab))
    q = distributions(draw, (batch, gamma, vocab))
    if draw(st.booleans()):
        drafts = draft_tokens(q, draw_u(draw, (batch, gamma)), mode)
    else:
        ids = draw(
            st.lists(st.integers(0, vocab - 1), min_size=batch * gamma, max_size=batch * gamma)
        )
        drafts = torch.tensor(ids, dtype=torch.long).reshape(batch, gamma)
    num_accepted, tokens = verify_chain(
        drafts, q, p, draw_u(draw, (batch, gamma)), draw_u(draw, (batch,)), mode
    )

    assert num_accepted.dtype == torch.long and tokens.dtype == torch.long
    assert tokens.shape == (batch, gamma + 1)
    assert ((num_accepted >= 0) & (num_accepted <= gamma)).all()
    for b in range(batch):
        n = int(num_accepted[b])
        assert tokens[b, :n].tolist() == drafts[b, :n].tolist()
        assert (tokens[b, n + 1 :] == -1).all()
        for i in range(n + 1):
            token = int(tokens[b, i])
            assert 0 <= token < vocab and p[b, i, token] > 0, (b, i, token)


@SETTINGS
@given(
    st.data(),
    st.integers(1, 3),
    st.integers(0, 4),
    st.integers(1, 5),
    st.sampled_from(["rs", "to"]),
)
def test_greedy_rule_holds_for_any_q_and_u(data, batch, gamma, vocab, mode) -> None:
    """Invariant: p one-hot (a temperature-0 request) → num_accepted is the length of the
    leading run of drafts equal to argmax p_i, and the token after them is argmax p, for any
    q (not even consistent with the drafts) and any uniforms in [0, 1)."""
    draw = data.draw
    target_ids = draw(
        st.lists(
            st.integers(0, vocab - 1), min_size=batch * (gamma + 1), max_size=batch * (gamma + 1)
        )
    )
    target = torch.tensor(target_ids, dtype=torch.long).reshape(batch, gamma + 1)
    p = torch.nn.functional.one_hot(target, vocab).float()
    q = distributions(draw, (batch, gamma, vocab))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=batch * gamma, max_size=batch * gamma))
    drafts = torch.tensor(ids, dtype=torch.long).reshape(batch, gamma)
    num_accepted, tokens = verify_chain(
        drafts, q, p, draw_u(draw, (batch, gamma)), draw_u(draw, (batch,)), mode
    )
    leading = (drafts == target[:, :gamma]).long().cumprod(1).sum(1)
    assert torch.equal(num_accepted, leading)
    rows = torch.arange(batch)
    assert torch.equal(tokens[rows, num_accepted], target[rows, num_accepted])


@SETTINGS
@given(
    st.data(),
    st.integers(1, 8),
    st.sampled_from([0.0, 1e-16, 0.5, U_MAX, 1.0 - 2.0**-53, 1.0]) | st.floats(0, 1),
)
def test_sample_from_probs_picks_a_positive_token(data, vocab, u) -> None:
    """Invariant: for any non-negative row with a positive entry (unnormalised, subnormal) and
    any u in [0, 1] (1.0 included, outside the contract), the id is in range with p > 0."""
    probs = torch.tensor(data.draw(st.lists(masses, min_size=vocab, max_size=vocab)))
    if probs.sum() == 0:
        probs[data.draw(st.integers(0, vocab - 1))] = 1e-45
    for dtype in (torch.float32, torch.float64):
        ids = sample_from_probs(probs[None], torch.tensor([u], dtype=torch.float64).to(dtype))
        assert 0 <= ids.item() < vocab and probs[ids.item()] > 0


logit_values = st.sampled_from([0.0, 1.0, -1.0, 2.5, float("-inf")]) | st.floats(-30, 30, width=32)


@SETTINGS
@given(
    st.lists(logit_values, min_size=1, max_size=8).filter(lambda xs: max(xs) > float("-inf")),
    st.sampled_from([0.0, 0.05, 0.5, 1.0, 2.0]),
    st.integers(-1, 9),
    st.sampled_from([1.0, 0.9, 0.5, 1e-3]) | st.floats(1e-3, 1.0),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_process_logits_gives_a_distribution(logits, temperature, top_k, top_p, min_p) -> None:
    """Invariants: the output is a float32 distribution (>= 0, sums to 1 within 1e-5, no nan);
    the raw argmax always keeps positive mass; with top-k on, every kept token's logit is >=
    the k-th largest; greedy rows are exactly one-hot."""
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    raw = torch.tensor([logits])
    probs = process_logits(raw, SamplingTensors.from_params([sp]))[0]
    assert probs.dtype == torch.float32 and not probs.isnan().any()
    assert (probs >= 0).all() and abs(probs.sum().item() - 1) < 1e-5
    assert probs[raw[0].argmax()] > 0
    k = sp.effective_top_k
    if 0 < k < len(logits):
        kth = raw[0].sort(descending=True).values[k - 1]
        assert (raw[0][probs > 0] >= kth).all()
    if sp.greedy:
        assert probs.max() == 1.0 and (probs > 0).sum() == 1
