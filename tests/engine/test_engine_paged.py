"""Paged KV cache in the engine: preemption, prefix sharing and their invalidation.

The statistical side (sampling under sharing + preemption stays exactly distributed) is the
`paged-auto-rs` configuration of tests/engine/test_engine_exactness.py; these are the greedy and
bookkeeping invariants.
"""

from __future__ import annotations

import pytest
import torch

from bebop_spec import LLM, SamplingParams

PROMPTS = [list(range(3, 3 + n)) for n in (37, 21, 50, 9)]  # several blocks of 8 each


def _greedy(n=40):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _run(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy outputs with a roomy pool and no prefix caching."""
    llm = LLM(str(tiny_model), mtp=str(tiny_model / "mtp"), spec_policy="fixed",
              block_size=8, enable_prefix_caching=False)  # fmt: skip
    return _run(llm, PROMPTS, _greedy())


@pytest.mark.parametrize("draft_mode", [None, "rs"])
def test_greedy_unchanged_by_preemption(tiny_model, reference, draft_mode):
    """With a pool of 24 blocks for 4 rows that grow to 11 blocks each, rows are preempted
    mid-generation and recomputed; greedy outputs equal the roomy run token for token, and
    every block returns to the pool."""
    llm = LLM(str(tiny_model), mtp=str(tiny_model / "mtp"), draft_mode=draft_mode,
              spec_policy="fixed", block_size=8, num_kv_blocks=24)  # fmt: skip
    assert _run(llm, PROMPTS, _greedy()) == reference
    eng = llm.engine
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_samples_and_requests_share_prompt_blocks(tiny_model):
    """n samples of one prompt share its full blocks, and a later request with the same
    prompt hits them too; the outputs equal an engine without prefix caching."""
    params = SamplingParams(temperature=0.0, max_tokens=12, n=4, ignore_eos=True)
    kw = {"mtp": str(tiny_model / "mtp"), "spec_policy": "fixed", "block_size": 8}
    shared = LLM(str(tiny_model), **kw)
    plain = LLM(str(tiny_model), enable_prefix_caching=False, **kw)
    prompt = PROMPTS[2]  # 50 tokens: 6 shareable blocks of 8
    assert _run(shared, [prompt], params) == _run(plain, [prompt], params)
    stats = shared.engine.blocks.stats
    assert stats.hit_tokens == 3 * 48  # samples 2..4 reuse sample 1's blocks
    assert _run(shared, [prompt], params) == _run(plain, [prompt], params)
    assert stats.hit_tokens == 3 * 48 + 4 * 48  # the second request: every sample hits
    assert plain.engine.blocks.stats.hit_tokens == 0


def test_weight_update_invalidates_prefixes(tiny_model):
    """After a weight update no prefix computed under the old weights is reused: outputs
    equal those of a fresh engine loaded with the new weights."""
    kw = {"mtp": str(tiny_model / "mtp"), "spec_policy": "fixed", "block_size": 8}
    llm = LLM(str(tiny_model), **kw)
    prompt = PROMPTS[0]
    _run(llm, [prompt], _greedy(8))  # fills the prefix cache
    names = llm.engine.weight_spec("target")
    new = {k: v.detach().clone() for k, v in llm.engine.runner.target.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for k in names:
        if k.endswith("mlp.down_proj.weight"):
            new[k] = new[k] + 0.05 * torch.randn(new[k].shape, generator=gen)
    update = {k: new[k] for k in names if k.endswith("mlp.down_proj.weight")}
    llm.engine.update_weights(update)
    hits = llm.engine.blocks.stats.hit_tokens
    after = _run(llm, [prompt], _greedy())
    assert llm.engine.blocks.stats.hit_tokens == hits  # nothing stale reused
    fresh = LLM(str(tiny_model), **kw)
    fresh.engine.update_weights(update)
    assert after == _run(fresh, [prompt], _greedy())


def test_flush_cache_invalidates_prefixes(tiny_model):
    """/flush_cache's engine call forgets cached prefixes."""
    llm = LLM(str(tiny_model), block_size=8, draft_mode=None)
    _run(llm, [PROMPTS[0]], _greedy(4))
    llm.engine.flush_cache()
    _run(llm, [PROMPTS[0]], _greedy(4))
    assert llm.engine.blocks.stats.hit_tokens == 0


def test_small_budget_caps_context(tiny_model):
    """A pool smaller than one full-length sequence lowers max_model_len (with a warning)
    instead of failing mid-generation; a prompt beyond it is refused up front."""
    llm = LLM(str(tiny_model), draft_mode=None, block_size=8, num_kv_blocks=8)
    assert llm.engine.max_model_len == 8 * 8 - 1
    from bebop_spec.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        llm.engine.add_request("x", list(range(70)), _greedy(4))


@pytest.mark.parametrize("draft_mode", [None, "rs"])
def test_release_kv_mid_generation_frees_and_recovers(tiny_model, reference, draft_mode):
    """release_kv (SGLang's release_memory_occupation) mid-generation frees both pools (their
    tensors hold no memory) and retracts every row; the next steps allocate the pools again
    and finish with the greedy outputs of an uninterrupted run, token for token."""
    llm = LLM(str(tiny_model), mtp=str(tiny_model / "mtp"), draft_mode=draft_mode,
              spec_policy="fixed", block_size=8, enable_prefix_caching=False)  # fmt: skip
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), p, _greedy())
    outs: dict[str, list[int]] = {}
    for _ in range(6):
        eng.step()
    held = eng.runner.cache.nbytes + (eng.runner.mtp_cache.nbytes if eng.runner.mtp_cache else 0)
    assert eng.release_kv() == held > 0
    assert eng.runner.cache.nbytes == 0 and eng.blocks.num_free == eng.blocks.num_blocks
    while eng.has_unfinished():
        for o in eng.step(only_finished=True):
            outs[o.request_id] = o.outputs[0].token_ids
    assert [[outs[str(i)]] for i in range(len(PROMPTS))] == reference
    assert not eng.runner.kv_released
