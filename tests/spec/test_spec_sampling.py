"""Sampling transforms and inverse-CDF sampling (bebop_spec.spec.sampling).

Run: python -m pytest -q tests/spec/test_spec_sampling.py
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats

from bebop_spec.sampling_params import SamplingParams
from bebop_spec.spec import (
    SamplingTensors,
    draw_uniforms,
    logprobs_of,
    make_generators,
    process_logits,
    sample_from_probs,
    top_logprobs,
)
from bebop_spec.spec.sampling import CDF_BLOCK

U_MAX = 1.0 - 2.0**-24  # the largest value torch.rand returns in float32


def reference_probs(logits: list[float], sp: SamplingParams) -> list[float]:
    """One row, written from the definitions in float64, with no vectorisation tricks."""
    vocab = len(logits)
    if sp.greedy:
        best = max(range(vocab), key=lambda v: (logits[v], -v))  # first index of the max
        return [1.0 if v == best else 0.0 for v in range(vocab)]
    scaled = [x / sp.temperature for x in logits]
    keep = [True] * vocab
    k = sp.effective_top_k
    if 0 < k < vocab:  # fewer than k tokens strictly above v
        keep = [sum(w > s for w in scaled) < k for s in scaled]
    probs = _softmax(scaled, keep)
    if sp.top_p < 1:  # mass of strictly more likely tokens below top_p
        keep = [keep[v] and sum(x for x in probs if x > probs[v]) < sp.top_p for v in range(vocab)]
        probs = _softmax(scaled, keep)
    if sp.min_p > 0:
        keep = [keep[v] and probs[v] >= sp.min_p * max(probs) for v in range(vocab)]
        probs = _softmax(scaled, keep)
    return probs


def _softmax(scaled: list[float], keep: list[bool]) -> list[float]:
    top = max(s for s, k in zip(scaled, keep, strict=True) if k)
    e = [
        math.exp(s - top) if k and s > -math.inf else 0.0 for s, k in zip(scaled, keep, strict=True)
    ]
    return [x / sum(e) for x in e]


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.6]),
        top_k=rng.choice([-1, 0, 1, 2, 3, 5, vocab, vocab + 3]),
        top_p=rng.choice([1.0, 1.0, 0.97, 0.8, 0.5, 0.2, 0.01, rng.uniform(0.05, 1.0)]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3, 0.9, 1.0]),
    )


def random_logits(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Half the rows on an integer grid (many exact ties), half continuous, a few -inf."""
    grid = torch.randint(-3, 4, shape, generator=gen).float()
    cont = 2.0 * torch.randn(shape, generator=gen)
    use_grid = torch.rand(shape[:-1] + (1,), generator=gen) < 0.5
    logits = torch.where(use_grid, grid, cont)
    masked = torch.rand(shape, generator=gen) < 0.1
    masked[..., 0] = False  # keep every row finite somewhere
    return logits.masked_fill(masked, float("-inf"))


@pytest.mark.parametrize("chain", [False, True])
def test_process_logits_matches_slow_reference(chain: bool) -> None:
    """Invariant: process_logits equals the per-row definition (temperature → top-k → top-p
    → min-p, renormalised; greedy → one-hot at the first raw argmax), for 300 rows of random
    per-row params, tied logits and -inf entries; also for [B,γ,V] input, where row b's
    params apply at every position. Same zero pattern exactly; probabilities within 1e-6."""
    gen, rng, vocab = torch.Generator().manual_seed(1), random.Random(1), 12
    params = [random_params(rng, vocab) for _ in range(300)]
    shape = (300, 3, vocab) if chain else (300, vocab)
    logits = random_logits(gen, shape)
    probs = process_logits(logits, SamplingTensors.from_params(params))
    assert probs.dtype == torch.float32 and probs.shape == shape
    rows = logits.reshape(300, -1, vocab)
    ref = torch.tensor(
        [[reference_probs(r.tolist(), sp) for r in rows[b]] for b, sp in enumerate(params)],
        dtype=torch.float64,
    ).reshape(shape)
    assert torch.equal(probs > 0, ref > 0)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=0)


def test_greedy_rows_are_exact_one_hot_at_first_raw_argmax() -> None:
    """Invariant: a temperature-0 row is exactly one-hot (1.0 and 0.0) at the first maximal
    raw logit, whatever its other params, in a batch that also holds sampled rows."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, -1.0], [0.0, 5.0, 5.0, 5.0]])
    params = [
        SamplingParams(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.0),
    ]
    probs = process_logits(logits, SamplingTensors.from_params(params))
    assert torch.equal(probs[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(probs[2], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert (probs[1] > 0).all()
    all_greedy = process_logits(logits[:1], SamplingTensors.from_params(params[:1]))
    assert torch.equal(all_greedy, probs[:1])


def test_sampling_tensors_from_params_and_row_ops() -> None:
    """Invariant: from_params maps top_k -1/0 to 0 (off) and temperature 0 to greedy;
    select / repeat_interleave move every per-row field together."""
    params = [
        SamplingParams(temperature=0.0, top_k=-1),
        SamplingParams(temperature=0.5, top_k=7, top_p=0.9, min_p=0.1),
    ]
    st = SamplingTensors.from_params(params)
    assert st.top_k.tolist() == [0, 7] and st.greedy.tolist() == [True, False]
    assert st.top_k.dtype == torch.long and st.temperature.dtype == torch.float32
    assert st.any_top_k and st.any_top_p and st.any_min_p and not st.all_greedy
    picked = st.select([1, 1, 0])
    assert picked.top_k.tolist() == [7, 7, 0] and picked.greedy.tolist() == [False, False, True]
    assert len(picked) == 3
    rep = st.repeat_interleave(2)
    assert rep.top_p.tolist() == pytest.approx([1.0, 1.0, 0.9, 0.9])
    assert SamplingTensors.from_params(params[:1]).all_greedy


@pytest.mark.parametrize("block", [CDF_BLOCK, 3])
def test_sample_from_probs_frequencies_match_probs(block: int) -> None:
    """Invariant: inverse-CDF sampling draws token v with probability probs[v] (also for an
    unnormalised row), in one block and over several (block 3: 6 blocks, the last padded).
    200,000 draws over 16 tokens, 6 of them zero: zero tokens never drawn, chi-square
    goodness of fit on the rest, p-value > 1e-3 (fixed seed, deterministic)."""
    gen, n = torch.Generator().manual_seed(2), 200_000
    probs = torch.rand(16, generator=gen) + 0.05
    probs[[0, 3, 4, 9, 14, 15]] = 0.0
    probs = 3.0 * probs  # sample_from_probs normalises by the row total itself
    ids = sample_from_probs(probs.expand(n, 16), torch.rand(n, generator=gen), block)
    counts = torch.bincount(ids, minlength=16)
    assert counts[probs == 0].sum() == 0
    pos = probs > 0
    expected = probs[pos].double() / probs[pos].double().sum() * n
    result = stats.chisquare(counts[pos].double().numpy(), expected.numpy())
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("block", [CDF_BLOCK, 2, 3])
def test_sample_from_probs_never_picks_zero_probability_tokens(block: int) -> None:
    """Invariant: whatever the uniform (0, U_MAX, 1 − 2⁻⁵³ in float64, even 1.0) and however
    many zeros (leading, interior, trailing, a single positive subnormal, whole zero blocks),
    the pick has p > 0, with one block or several."""
    rows = torch.tensor(
        [
            [0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1e-45, 0.0, 0.0, 0.0],
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4 + 1e-7],
            [1e-30, 0.0, 1e-30, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    for u_value in [0.0, 1e-12, 0.5, U_MAX, 1.0 - 2.0**-53, 1.0]:
        for dtype in (torch.float32, torch.float64):
            u = torch.full((rows.shape[0],), u_value, dtype=torch.float64).to(dtype)
            ids = sample_from_probs(rows, u, block)
            assert (rows.gather(1, ids[:, None]) > 0).all(), (u_value, ids)


def test_blocked_inverse_cdf_equals_one_cumsum() -> None:
    """Invariant: the two-level inverse CDF picks the token one float64 cumsum over the whole
    vocabulary picks. 512 rows of SmolLM2's vocabulary size (49,152 = 192 blocks) and of a
    size that pads the last block (1,000), softmax of N(0, 3²) logits with a third of the
    entries zeroed, u ~ U[0, 1): every pick equal (a disagreement needs u * total within
    float64 rounding of a block boundary, probability ~1e-12 per draw)."""
    gen = torch.Generator().manual_seed(5)
    for vocab in (49_152, 1_000):
        probs = torch.softmax(3 * torch.randn(512, vocab, generator=gen), -1)
        probs = probs.masked_fill(torch.rand(512, vocab, generator=gen) < 1 / 3, 0.0)
        u = torch.rand(512, generator=gen)
        cdf = probs.double().cumsum(-1)
        expected = torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:], right=True)
        assert torch.equal(sample_from_probs(probs, u), expected.squeeze(-1))


def test_logprobs_and_top_alternatives() -> None:
    """Invariant: logprobs_of gives log p[id] (0.0 for -1 padding); top_logprobs gives the k
    most likely tokens in descending order, -inf for tokens cut by the transforms."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 1.0, 0.0, 0.0]])
    lp = logprobs_of(probs, torch.tensor([2, -1]))
    assert lp.tolist() == pytest.approx([math.log(0.3), 0.0])
    values, ids = top_logprobs(probs, 3)
    assert ids[0].tolist() == [0, 2, 3]
    assert values[0].tolist() == pytest.approx([math.log(0.5), math.log(0.3), math.log(0.2)])
    assert ids[1, 0] == 1 and values[1, 0] == 0 and values[1, 1:].eq(-math.inf).all()
    assert top_logprobs(probs, 10)[1].shape == (2, 4)


def test_seeded_rows_are_reproducible_whatever_the_batch() -> None:
    """Invariant: a seeded row's uniforms depend only on its seed and how many it drew, not
    on the other rows in the batch; unseeded rows differ from each other."""
    a = draw_uniforms(make_generators([7, None, 3]), 5)
    b = draw_uniforms(make_generators([None, 3, 11, 7]), 5)
    assert a.shape == (3, 5) and a.dtype == torch.float32
    assert torch.equal(a[0], b[3]) and torch.equal(a[2], b[1])
    assert not torch.equal(a[1], b[0])
    gens = make_generators([7])
    first, second = draw_uniforms(gens, 2), draw_uniforms(gens, 3)
    assert torch.equal(torch.cat([first, second], 1), a[:1])
    assert ((a >= 0) & (a < 1)).all()
    assert draw_uniforms([], 4).shape == (0, 4)
