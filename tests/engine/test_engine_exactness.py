"""Speculative sampling leaves the output distribution exactly unchanged.

Setup: a random Qwen3 target with a 6-token vocabulary and a deliberately unrelated random
MTP head. The `auto-*` configurations let the engine choose γ_t ∈ {0..γ} per step from
earlier steps' timings and acceptance (engine/gamma.py), so plain and drafting steps
interleave within one request's samples. `paged-auto-rs` adds prefix sharing (all samples
share a 21-token prompt's blocks) and preemption (a KV pool too small for the batch);
`vocab-*` restricts the head's drafts to 3 of the 6 tokens (spec/draft_vocab.py). For
each configuration we draw N = 40,000 samples of the first 4 generated tokens
(one request, n = N, seeded) and compare their empirical joint distribution over the
6^4 = 1,296 outcomes with the exact probabilities p(x1) p(x2|x1) p(x3|x1,x2) p(x4|...)
computed from full forwards of the target under the same sampling transforms. Token 1 comes
from prefill; tokens 2-4 come from speculative steps (accepted drafts, residuals and bonus
tokens, sometimes across two steps). Test: G-test of goodness of fit, cells with expected
count < 5 pooled; the configuration passes when p-value > 1e-3. Seeds are fixed, so the
test is deterministic; with a correct sampler the chance of a false failure is 0.1% per
configuration.
"""

from __future__ import annotations

import pytest
import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.models.mtp_io import save_draft_vocab
from bebop_spec.testing import exact_joint, g_test

V, K, N = 6, 4, 40_000
PROMPT = [1, 4, 2]


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    from bebop_spec.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("v6") / "m", vocab_size=V, seed=11,
                           eos_token_id=V + 100)  # fmt: skip


CONFIGS = [
    ("none", 1, {"temperature": 1.0}),
    ("rs", 3, {"temperature": 1.0}),
    ("auto-rs", 3, {"temperature": 1.0}),
    ("auto-to", 2, {"temperature": 0.8, "top_k": 4}),
    ("to", 3, {"temperature": 1.0}),
    ("rs", 2, {"temperature": 1.0, "top_k": 3}),
    ("rs", 2, {"temperature": 0.8, "top_p": 0.8}),
    ("to", 2, {"temperature": 1.0, "top_k": 4, "min_p": 0.05}),
    ("paged-auto-rs", 3, {"temperature": 1.0}),
    ("vocab-rs", 3, {"temperature": 1.0}),
    ("vocab-rs", 2, {"temperature": 0.8, "top_k": 4}),
    ("vocab-to", 2, {"temperature": 1.0}),
]
# "paged-*": a 21-token prompt in blocks of 4 (all N samples share its first 5 blocks) and
# a KV pool of 600 blocks for 512 running rows that need 3 private blocks each: samples are
# preempted mid-generation and recomputed, under sharing and the auto policy.
PAGED = {"block_size": 4, "num_kv_blocks": 600}
LONG_PROMPT = [1, 4, 2, 5, 0, 3, 3, 1, 2, 4, 0, 5, 1, 1, 2, 3, 4, 5, 0, 2, 1]
# "vocab-*": the head drafts over 3 of the 6 tokens (q = 0 on 0, 3, 5); those still come out
# with their exact probabilities, through the residual max(p − q, 0).
DRAFT_VOCAB = [4, 1, 2, 0, 3, 5]


@pytest.mark.parametrize(("mode", "gamma", "kw"), CONFIGS)
def test_joint_distribution_is_exact(small_vocab_model, mode, gamma, kw):
    """N = 40,000 seeded samples of 4 tokens match the exact joint over 6^4 outcomes: G-test
    (cells with expected count < 5 pooled), pass at p > 1e-3; with speculation drafts are both
    accepted and rejected, and the auto-γ / paging / draft-vocab paths run where configured."""
    paged, vocab = mode.startswith("paged-"), mode.startswith("vocab-")
    policy, _, draft = mode.removeprefix("paged-").removeprefix("vocab-").rpartition("-")
    extra = dict(PAGED) if paged else {}
    if vocab:
        save_draft_vocab(small_vocab_model / "mtp", DRAFT_VOCAB)
        extra["draft_vocab_size"] = 3
    prompt = LONG_PROMPT if paged else PROMPT
    llm = LLM(str(small_vocab_model), mtp=str(small_vocab_model / "mtp"),
              draft_mode=None if draft == "none" else draft, num_speculative_tokens=gamma,
              spec_policy=policy or "fixed", max_num_seqs=512, seed=2024, **extra)  # fmt: skip
    if policy:  # time every step: each batch here is a prefill and 3 decode steps, which the
        llm.engine.gamma_policy.after_prefill = 0  # settling rule would leave all untimed
    params = SamplingParams(max_tokens=K, n=N, seed=2024, ignore_eos=True, **kw)
    out = llm.generate([prompt], params)[0]
    idx = torch.tensor([c.token_ids for c in out.outputs])
    assert idx.shape == (N, K)
    flat = (idx * torch.tensor([V ** (K - 1 - i) for i in range(K)])).sum(1)
    counts = torch.bincount(flat, minlength=V**K).double()
    probs = exact_joint(small_vocab_model, params, prompt, V, K)
    p_value = g_test(counts, probs)
    if mode != "none":
        s = llm.spec_stats
        assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # both paths exercised
    if policy:  # plain steps and drafting steps both ran
        chosen = llm.engine.gamma_policy.chosen
        assert chosen[0] > 0 and sum(chosen[1:]) > 0, chosen
    if paged:  # sharing and preemption both happened
        assert llm.engine.blocks.stats.hit_tokens > 0 and llm.engine.scheduler.num_preemptions > 0
    if vocab:  # the drafts stayed in the draft vocabulary, and the rest still came out
        assert llm.engine.runner.draft_ids.tolist() == sorted(DRAFT_VOCAB[:3])
        assert set(flat.remainder(V).tolist()) >= {0, 3, 5}
    assert p_value > 1e-3, f"{mode} {kw}: G-test p = {p_value:.2e}"
