"""Penalties, logit bias and min_tokens (bebop_spec.spec.penalties) and speculation with them.

Run: python -m pytest -q tests/spec/test_spec_penalties.py
(the statistical test at the end takes a few minutes of CPU.)
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.spec import (
    PenaltyTensors,
    SamplingTensors,
    TokenHistory,
    apply_penalties,
    process_logits,
)
from bebop_spec.testing import exact_joint, g_test

# ---------------------------------------------------------------- the pure functions


def reference_penalised(
    logits: list[float], prompt: list[int], output: list[int], sp: SamplingParams, eos: list[int]
) -> list[float]:
    """One row, written from vLLM's definitions token by token in float64."""
    out = list(logits)
    if len(output) < sp.min_tokens:
        for t in set(eos) | set(sp.stop_token_ids):
            if t < len(out):
                out[t] = -math.inf
    for t, b in (sp.logit_bias or {}).items():
        out[t] += b
    for v in range(len(out)):
        count = output.count(v)
        if v in prompt or count:
            r = sp.repetition_penalty
            out[v] = out[v] / r if out[v] > 0 else out[v] * r
        out[v] -= sp.frequency_penalty * count + sp.presence_penalty * (count > 0)
    return out


def _random_case(rng: random.Random, vocab: int) -> tuple[list[int], list[int], SamplingParams]:
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
    sp = SamplingParams(
        max_tokens=16,
        repetition_penalty=rng.choice([1.0, 0.7, 1.3, 2.0]),
        frequency_penalty=rng.choice([0.0, 0.5, -0.4, 2.0]),
        presence_penalty=rng.choice([0.0, 1.0, -1.5]),
        min_tokens=rng.choice([0, 3, 6]),
        stop_token_ids=rng.choice([[], [2], [4, 7]]),
        logit_bias=rng.choice([None, {1: 5.0}, {0: -3.0, vocab - 1: 2.5}]),
    )
    return prompt, output, sp


def test_apply_penalties_matches_reference_loop() -> None:
    """Invariant: for random logits, prompts, outputs and parameters (one batch of 64 rows, every
    stage on somewhere, EOS id 9 plus stop ids), apply_penalties equals the token-by-token
    float64 reference (to 1e-5; -inf exactly where the reference has -inf)."""
    rng, vocab, eos = random.Random(0), 11, [9]
    cases = [_random_case(rng, vocab) for _ in range(64)]
    prompts, outputs, params = zip(*cases, strict=True)
    logits = torch.randn(len(cases), vocab, generator=torch.Generator().manual_seed(0)) * 3
    pt = PenaltyTensors.from_params(params, eos)
    hist = TokenHistory.from_ids(prompts, outputs, vocab)
    got = apply_penalties(logits, pt, hist).double()
    want = torch.tensor([reference_penalised(row, p, o, sp, eos) for row, p, o, sp in
                         zip(logits.double().tolist(), prompts, outputs, params, strict=True)],
                        dtype=torch.float64)  # fmt: skip
    assert torch.equal(got.isinf(), want.isinf())
    finite = ~want.isinf()
    assert torch.allclose(got[finite], want[finite], atol=1e-5)
    assert pt.any_repetition and pt.any_additive and pt.any_min_tokens and pt.any_bias


def test_chain_history_equals_history_of_the_extended_output() -> None:
    """Invariant (what keeps speculation exact): position k of `along(drafts)`, and k steps of
    `advance`, read the same counts and length as a fresh history of output + drafts[:k]; so
    p and q at chain position k are the distributions plain decoding would use there."""
    rng, vocab, gamma = random.Random(1), 7, 4
    prompts = [[rng.randrange(vocab) for _ in range(3)] for _ in range(5)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 5))] for _ in range(5)]
    drafts = torch.randint(vocab, (5, gamma), generator=torch.Generator().manual_seed(1))
    hist = TokenHistory.from_ids(prompts, outputs, vocab)
    chain, stepped = hist.along(drafts), hist
    for k in range(gamma + 1):
        ext = [o + d[:k] for o, d in zip(outputs, drafts.tolist(), strict=True)]
        fresh = TokenHistory.from_ids(prompts, ext, vocab)
        assert torch.equal(chain.counts[:, k], fresh.counts)
        assert torch.equal(chain.num_generated[:, k], fresh.num_generated)
        assert torch.equal(stepped.counts, fresh.counts)
        assert torch.equal(stepped.num_generated, fresh.num_generated)
        if k < gamma:
            stepped = stepped.advance(drafts[:, k])
    assert torch.equal(chain.prompt_mask, hist.prompt_mask)


def test_process_logits_applies_penalties_first_and_fast_path() -> None:
    """Invariant: process_logits(logits, st, hist) == process_logits(apply_penalties(logits), st
    without penalties) for every row, greedy rows included (argmax of the penalised logits) and
    for a [B, γ+1, V] chain; default params build no PenaltyTensors (nothing extra runs) and a
    batch with penalties but no history is refused."""
    vocab = 8
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=3.0),
        SamplingParams(temperature=0.7, top_k=4, frequency_penalty=1.0, logit_bias={3: 2.0}),
        SamplingParams(temperature=1.0, top_p=0.8, min_tokens=2, stop_token_ids=[1]),
    ]
    logits = torch.randn(3, 5, vocab, generator=torch.Generator().manual_seed(2)) * 2
    hist = TokenHistory.from_ids([[0, 1], [2], [5]], [[4], [3, 3], []], vocab)
    chain = hist.along(torch.tensor([[4, 4, 0, 1], [3, 2, 2, 7], [1, 1, 6, 5]]))
    st = SamplingTensors.from_params(params)
    unpenalised = [SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p)
                   for sp in params]  # fmt: skip
    plain = SamplingTensors.from_params(unpenalised)
    assert plain.penalties is None
    want = process_logits(apply_penalties(logits.clone(), st.penalties, chain), plain)
    assert torch.equal(process_logits(logits, st, chain), want)
    assert not torch.equal(process_logits(logits, plain), want)
    assert torch.equal(process_logits(logits[:, 0], st, hist), want[:, 0])
    with pytest.raises(ValueError, match="TokenHistory"):
        process_logits(logits, st)


def test_sampling_params_validation() -> None:
    """Invariant: penalties are range-checked at construction as vLLM does, logit_bias keys
    become ints, and `uses_penalties` is false exactly at the defaults."""
    assert not SamplingParams().uses_penalties
    assert SamplingParams(logit_bias={"3": 1}).logit_bias == {3: 1.0}
    assert SamplingParams(min_tokens=2).uses_penalties
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
                {"min_tokens": 20, "max_tokens": 10}, {"logit_bias": {-1: 1.0}},
                {"logit_bias": {1: math.nan}}):  # fmt: skip
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ---------------------------------------------------------------- the engine

V, K, N = 6, 4, 40_000
EOS = 5
PROMPT = [1, 4, 2, 4]


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """Random Qwen3 target with a 6-token vocabulary whose EOS (5) is a real token, plus an
    unrelated random MTP head: repeats are unavoidable, so the penalties bite at every step."""
    from bebop_spec.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("v6eos") / "m", vocab_size=V, seed=11,
                           eos_token_id=EOS)  # fmt: skip


GREEDY_PROMPTS = [[1, 4, 2, 4], [0], [3, 3, 1], [2, 0, 1, 4, 4, 0], [5, 1], [4], [0, 1, 2, 3]]
PENALISED = SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.6,
                           frequency_penalty=0.8, presence_penalty=0.4, min_tokens=8,
                           logit_bias={2: 1.0, EOS: -1.0})  # fmt: skip


@pytest.mark.parametrize("mode", ["rs", "to", "auto-rs"])
def test_greedy_with_penalties_speculation_equals_plain(small_vocab_model, mode):
    """Invariant: with every penalty, logit bias and min_tokens on, greedy speculation (fixed
    γ = 3, or the auto policy mixing γ_t = 0 plain steps) emits the plain greedy tokens one for
    one, batched and alone. Greedy output is argmax p at each position, so this checks the
    target side: p at chain position k must count drafts d_1..d_{k-1} (a history that ignores
    them fails here). Also: the penalties change the output, and rows run to >= min_tokens."""
    model = str(small_vocab_model)
    policy, _, draft = mode.rpartition("-")
    plain = LLM(model, draft_mode=None)
    spec = LLM(model, mtp=str(small_vocab_model / "mtp"), draft_mode=draft,
               num_speculative_tokens=3, spec_policy=policy or "fixed")  # fmt: skip
    ref = [o.outputs[0].token_ids for o in plain.generate(GREEDY_PROMPTS, PENALISED)]
    unpenalised = SamplingParams(temperature=0.0, max_tokens=24)
    assert ref != [o.outputs[0].token_ids for o in plain.generate(GREEDY_PROMPTS, unpenalised)]
    assert all(len(r) >= 8 for r in ref)
    assert [o.outputs[0].token_ids for o in spec.generate(GREEDY_PROMPTS, PENALISED)] == ref
    alone = [spec.generate([p], PENALISED)[0].outputs[0].token_ids for p in GREEDY_PROMPTS]
    assert alone == ref
    assert spec.spec_stats.num_accepted_tokens > 0


def test_engine_refuses_logit_bias_outside_the_vocabulary(small_vocab_model):
    """Invariant: a logit_bias id >= vocab fails its own request, never the batch's step."""
    from bebop_spec.errors import InvalidRequest

    llm = LLM(str(small_vocab_model), draft_mode=None)
    with pytest.raises(InvalidRequest, match="logit_bias"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={V: 1.0}))


def test_min_tokens_defers_stop_strings(tiny_text_model):
    """Invariant (vLLM): no stop string ends a sequence before min_tokens tokens; with
    min_tokens = max_tokens a stop string met early no longer stops it."""
    llm = LLM(str(tiny_text_model), draft_mode=None)
    greedy = {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}
    ref = llm.generate("Hello world", SamplingParams(**greedy))[0].outputs[0]
    stop = ref.text[3:6]
    early = llm.generate("Hello world", SamplingParams(**greedy, stop=[stop]))[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 20
    late = SamplingParams(**greedy, stop=[stop], min_tokens=20)
    out = llm.generate("Hello world", late)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 20


# ---------------------------------------------------------------- exactness


def _canonical(tokens: torch.Tensor) -> torch.Tensor:
    """[M, K] rows -> flat outcome index; tokens after the first EOS are set to 0 (a row that
    stopped at EOS and the full rows continuing it are one outcome)."""
    after = (tokens == EOS).long().cumsum(1) - (tokens == EOS).long() > 0
    tokens = tokens.masked_fill(after, 0)
    return (tokens * torch.tensor([V ** (K - 1 - i) for i in range(K)])).sum(1)


@pytest.mark.parametrize(("mode", "gamma"), [("rs", 3)])
def test_joint_distribution_with_penalties_is_exact(small_vocab_model, mode, gamma):
    """Invariant: speculative sampling with repetition_penalty 1.3, frequency_penalty 0.5 and
    min_tokens 2 (EOS = 5 in the 6-token vocabulary, so rows stop at EOS from token 3 on)
    gives exactly the distribution of plain sampling under the same penalties.

    Setup as tests/engine/test_engine_exactness.py: random Qwen3 target, unrelated random MTP head,
    N = 40,000 samples (one request, n = N, seeded) of up to K = 4 tokens. Outcomes are the
    6^4 tuples with everything after the first EOS set to 0; exact probabilities come from
    exact_joint (full forwards, the penalties reading each prefix as the output so far),
    summed onto the same outcomes. An observed outcome of probability zero (e.g. EOS among
    the first two tokens) fails outright. Test: G-test of goodness of fit, cells with expected
    count < 5 pooled, pass when p-value > 1e-3 (seeds fixed: deterministic; a correct sampler
    fails with probability 0.1%)."""
    model = small_vocab_model
    llm = LLM(str(model), mtp=str(model / "mtp"), draft_mode=mode, num_speculative_tokens=gamma,
              spec_policy="fixed", max_num_seqs=512, seed=2024)  # fmt: skip
    params = SamplingParams(max_tokens=K, n=N, seed=2024, repetition_penalty=1.3,
                            frequency_penalty=0.5, min_tokens=2)  # fmt: skip
    outs = llm.generate([PROMPT], params)[0].outputs
    rows = [c.token_ids + [0] * (K - len(c.token_ids)) for c in outs]
    assert all(len(c.token_ids) == K or c.token_ids[-1] == EOS for c in outs)
    assert any(len(c.token_ids) < K for c in outs)  # EOS stops happened
    counts = torch.bincount(_canonical(torch.tensor(rows)), minlength=V**K).double()
    joint = exact_joint(model, params, PROMPT, V, K)
    all_tuples = torch.cartesian_prod(*[torch.arange(V)] * K)
    probs = torch.zeros(V**K, dtype=torch.float64).index_add_(0, _canonical(all_tuples), joint)
    p_value = g_test(counts, probs)
    s = llm.spec_stats
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # both paths exercised
    print(f"{mode} γ={gamma} penalties: G-test p = {p_value:.3g}")
    assert p_value > 1e-3, f"{mode}: G-test p = {p_value:.2e}"
