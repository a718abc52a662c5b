"""Prompt scoring and chosen-id logprobs in the engine (engine/prompt_logprobs.py).

Prompt logprobs are log p(x_i | x_<i) under the raw model; the reference is transformers'
forward of the whole prompt on the same weights (max |Δ| < 1e-4 in fp32, as tests/models/test_models.py
holds the decoder to).
"""

from __future__ import annotations

import pytest
import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.engine.prompt_logprobs import score_prompt

TOL = 1e-4
PROMPT = [(7 * i + 3) % 64 for i in range(41)]  # several blocks of 8


@pytest.fixture(scope="module")
def reference(tiny_model):
    """log_softmax of transformers' logits over the whole prompt: ref[i] scores PROMPT[i + 1]."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].float()
    return torch.log_softmax(logits, -1)


def _llm(tiny_model, **kw):
    return LLM(str(tiny_model), mtp=str(tiny_model / "mtp"), spec_policy="fixed", block_size=8,
               **kw)  # fmt: skip


def _expected(ref: torch.Tensor, start: int) -> list[float]:
    return [float(ref[i - 1, PROMPT[i]]) for i in range(start + 1, len(PROMPT))]


def test_prompt_logprobs_match_transformers(tiny_model, reference):
    """Every prompt token from position 1 is scored as transformers scores it, with its rank
    and top-3 (max |Δ| < 1e-4); max_tokens=0 scores without generating."""
    llm = _llm(tiny_model)
    sp = SamplingParams(max_tokens=0, prompt_logprobs=3)
    out = llm.generate([PROMPT], sp)[0]
    pl = out.prompt_logprobs
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert pl.start == 1 and len(pl.logprobs) == len(PROMPT) - 1
    assert max(abs(a - b) for a, b in zip(pl.logprobs, _expected(reference, 0), strict=True)) < TOL
    for t, i in enumerate(range(1, len(PROMPT))):
        row = reference[i - 1]
        assert pl.ranks[t] == int((row > row[PROMPT[i]]).sum()) + 1
        top = row.topk(3)
        assert list(pl.top[t]) == top.indices.tolist()
        assert (
            max(abs(a - b) for a, b in zip(pl.top[t].values(), top.values.tolist(), strict=True))
            < TOL
        )


@pytest.mark.parametrize("start", [0, 17])
def test_cached_prefix_is_recomputed_for_scoring(tiny_model, reference, start):
    """A prompt whose blocks another request left in the prefix cache is still scored from its
    first causal row: the cache may cover positions < start only (vLLM/SGLang do the same)."""
    llm = _llm(tiny_model)
    llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0))  # fills the cache
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0,
                        prompt_logprob_start=start)  # fmt: skip
    out = llm.generate([PROMPT], sp)[0]
    exp = _expected(reference, start)
    assert out.prompt_logprobs.start == start + 1 and len(out.prompt_logprobs.logprobs) == len(exp)
    assert max(abs(a - b) for a, b in zip(out.prompt_logprobs.logprobs, exp, strict=True)) < TOL
    assert llm.engine.blocks.stats.hit_tokens == 8 * (start // 8)


def test_scoring_survives_preemption_and_n(tiny_model, reference):
    """With n = 3 samples in a pool too small for all of them (rows are preempted and
    recomputed), the prompt is scored once, correctly, and every sample completes."""
    llm = _llm(tiny_model, num_kv_blocks=14)
    sp = SamplingParams(n=3, max_tokens=30, ignore_eos=True, prompt_logprobs=1, seed=1)
    out = llm.generate([PROMPT], sp)[0]
    assert [len(o.token_ids) for o in out.outputs] == [30, 30, 30]
    assert llm.engine.scheduler.num_preemptions > 0
    got = out.prompt_logprobs.logprobs
    assert max(abs(a - b) for a, b in zip(got, _expected(reference, 0), strict=True)) < TOL


@pytest.mark.parametrize("draft_mode", [None, "rs"])
def test_logprob_token_ids_cover_the_sampled_token(tiny_model, draft_mode):
    """Asking for every id of the (64-token) vocabulary at each generated position returns a
    distribution (logsumexp = 0 within 1e-4) whose entry at the sampled token is the token's
    own logprob: chosen ids read the same processed p, also at speculative positions."""
    llm = _llm(tiny_model, draft_mode=draft_mode)
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, logprobs=0,
                        logprob_token_ids=list(range(64)), prompt_logprobs=0, seed=3)  # fmt: skip
    out = llm.generate([PROMPT], sp)[0]
    o = out.outputs[0]
    assert len(o.token_ids_logprobs) == len(o.token_ids)
    for tok, lp, row in zip(o.token_ids, o.logprobs, o.token_ids_logprobs, strict=True):
        assert abs(row[tok] - lp) < 1e-5
        assert abs(torch.logsumexp(torch.tensor(list(row.values())), 0).item()) < 1e-4
        assert sum(v > -float("inf") for v in row.values()) <= 20  # top-k applied
    for row in out.prompt_logprobs.chosen:  # the prompt side: raw p over the whole vocabulary
        assert abs(torch.logsumexp(torch.tensor(list(row.values())), 0).item()) < 1e-4


def test_score_prompt_chunks_agree():
    """Chunking the rows (3 at a time) gives the one-shot scores (within 1e-5: a matmul over
    fewer rows may round differently), the same ranks and the same top-k tokens."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g)
    hidden, targets = torch.randn(11, 8, generator=g), torch.randint(50, (11,), generator=g)
    a = score_prompt(hidden, targets, lambda h: h @ w.T, 1, top_k=4, token_ids=[1, 5], chunk=3)
    b = score_prompt(hidden, targets, lambda h: h @ w.T, 1, top_k=4, token_ids=[1, 5], chunk=64)
    assert len(a.logprobs) == 11 and a.ranks == b.ranks and a.start == b.start
    assert [list(t) for t in a.top] == [list(t) for t in b.top]
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    flat = [v for rows in (a.chosen, b.chosen) for r in rows for v in r.values()]
    assert torch.allclose(torch.tensor(flat[:22]), torch.tensor(flat[22:]), atol=1e-5)


def test_bad_scoring_requests_are_refused(tiny_model):
    """A start at or past the prompt's end, or a chosen id outside the vocabulary, is an
    InvalidRequest before anything runs; max_tokens=0 without prompt scoring is a ValueError."""
    from bebop_spec.errors import InvalidRequest

    llm = _llm(tiny_model)
    with pytest.raises(InvalidRequest, match="prompt_logprob_start"):
        llm.engine.add_request(
            "a", PROMPT, SamplingParams(prompt_logprobs=0, prompt_logprob_start=len(PROMPT))
        )
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        llm.engine.add_request("b", PROMPT, SamplingParams(logprob_token_ids=[64]))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
