"""The training chain sees exactly the serving context (bebop_spec.train.chain, context="serve").

At serving time the head's KV cache holds chain-step-0 pairs (h_j, x_{j+1}) for j <= t, and a
draft round's step k also sees the keys of that round's own steps 1..k (engine/runner.py
`_draft`). These tests run that computation — by hand with MTPHead.forward + KVCache, and
inside the real engine — and compare its draft logits with the training chain's.

Run: python -m pytest -q tests/train/test_train_chain.py
"""

from __future__ import annotations

import pytest
import torch

from bebop_spec.models import KVCache, init_mtp_head, load_model, save_mtp_head
from bebop_spec.testing import make_tiny_model, randomize_weights
from bebop_spec.train.chain import teacher_forced_chain

VOCAB, GAMMA = 48, 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, target): random 2-layer Qwen3, 4 query heads over 2 kv heads (GQA)."""
    root = tmp_path_factory.mktemp("chain")
    model_dir = make_tiny_model(root / "model", vocab_size=VOCAB, hidden_size=32, mtp_layout=None)
    return model_dir, load_model(model_dir).target


def _head(target, layout: str, seed: int = 7):
    head = init_mtp_head(target.config, layout, 1, seed=seed)
    randomize_weights(head, seed)  # every tensor visibly matters, attention is far from uniform
    return head


def _data(seed: int = 1):
    """ids[2,14] and a loss mask with gaps, so starts are not contiguous."""
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, :4] = False
    mask[1, 8] = False
    return ids, mask


@torch.no_grad()
def _served_logits(target, head, ids, row: int, starts: list[int], gamma: int) -> list[Tensor]:
    """What ModelRunner._draft computes, teacher-forced: one head cache for the row, visited in
    increasing start order. Each round catches up the pending step-0 pairs (h_j, x_{j+1}) up to
    t, then chains steps 1..γ-1 at t+1..t+γ-1 — whose cache entries the next round overwrites,
    as the engine's rollback does. Returns [γ, V] per start."""
    cfg = target.config
    seq = ids.shape[1]
    h = target(ids, torch.arange(seq).expand_as(ids))[row : row + 1]
    x = ids[row : row + 1]
    cache = KVCache(1, 1, seq + gamma, cfg.num_key_value_heads, cfg.head_dim)
    slots, done, out = torch.zeros(1, dtype=torch.long), 0, []
    for t in starts:
        pos = torch.arange(done, t + 1)[None]
        g = head(h[:, done : t + 1], x[:, done + 1 : t + 2], pos, cache, slots,
                 embed=target.embed, step=0)[:, -1]  # fmt: skip
        logits = [target.compute_logits(g[0])]
        for k in range(1, gamma):
            pos_k = torch.tensor([[t + k]])
            g = head(g[:, None], x[:, t + k + 1 : t + k + 2], pos_k, cache, slots,
                     embed=target.embed, step=k)[:, 0]  # fmt: skip
            logits.append(target.compute_logits(g[0]))
        out.append(torch.stack(logits))
        done = t + 1
    return out


Tensor = torch.Tensor


@pytest.mark.parametrize("layout", ["qwen3_next", "deepseek_v3"])
def test_serve_chain_equals_the_engine_computation_by_hand(tiny, layout):
    """Every complete start of both rows (γ = 3; row 1 has a gap in its mask): the training
    chain's draft logits equal the KV-cached serving computation's (abs tol 1e-5, float32),
    including start 0 where deepseek_v3 zeroes the embedding. The old causal context does not
    (max difference > 1e-3), so the comparison can tell the two apart."""
    _, target = tiny
    head = _head(target, layout)
    ids, mask = _data()
    out = teacher_forced_chain(target, head, ids, mask, GAMMA)
    causal = teacher_forced_chain(target, head, ids, mask, GAMMA, context="causal")
    starts = out.starts.tolist()
    assert [0, 0] in starts
    gap = 0
    for row in (0, 1):
        ts = [t for b, t in starts if b == row]
        want = _served_logits(target, head, ids, row, ts, GAMMA)
        for t, w in zip(ts, want, strict=True):
            n = starts.index([row, t])
            torch.testing.assert_close(out.draft_logits[n].detach(), w, atol=1e-5, rtol=0)
            gap = max(gap, (causal.draft_logits[n, 1:].detach() - w[1:]).abs().max().item())
    assert gap > 1e-3


def _capture_draft_rounds(runner) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Wrap ModelRunner._draft: every draft round appends (committed ids, drafts, q[γ, V])."""
    rounds, draft = [], runner._draft

    def capture(seqs, *rest):
        drafts, q = draft(seqs, *rest)
        for b, s in enumerate(seqs):
            rounds.append((s.all_ids[: s.num_cached + 1], drafts[b].tolist(), q[b].clone()))
        return drafts, q

    runner._draft = capture
    return rounds


def test_serve_chain_equals_the_engines_q(tiny, tmp_path):
    """The engine itself (draft_mode rs, γ = 3, T = 1, no top-k/p, so q = softmax(logits)):
    every draft round's q[γ, V] is captured from ModelRunner._draft together with the committed
    tokens and the drafts; the training chain over committed + drafts (start t = last
    committed pair) gives softmax(draft logits) equal to q (abs tol 1e-5)."""
    from bebop_spec import LLM, SamplingParams

    model_dir, target = tiny
    head = _head(target, "qwen3_next", seed=11)
    save_mtp_head(head, tmp_path / "head", "qwen3_next", target.config, torch.float32)
    llm = LLM(str(model_dir), mtp=str(tmp_path / "head"), num_speculative_tokens=GAMMA,
              draft_mode="rs", device="cpu", dtype="float32", max_model_len=64,
              spec_policy="fixed")  # fmt: skip
    rounds = _capture_draft_rounds(llm.engine.runner)
    prompts = [[1, 5, 9, 2], [7, 3, 3, 8, 1, 4]]
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=12, seed=3))
    assert len(rounds) >= 6
    for committed, drafts, q in rounds:
        t = len(committed) - 2  # the last committed pair (h_t, x_{t+1}) sits at position t
        ids = torch.tensor([committed + drafts])  # the last draft is step γ-1's label
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, t + 2 :] = True  # start t is the only complete chain
        out = teacher_forced_chain(target, head, ids, mask, GAMMA)
        assert out.starts.tolist() == [[0, t]]
        got = out.draft_logits[0].detach().softmax(-1)
        torch.testing.assert_close(got, q, atol=1e-5, rtol=0)


def test_serve_chain_gradients_reach_every_head_parameter_and_not_the_target(tiny):
    """A loss on the last step's logits only: every head tensor gets a finite, non-zero gradient
    (so the chain is differentiable through g^0, g^1 and the step-0 and chain keys). With the
    target's parameters made trainable, only the two tensors the head borrows (embedding and LM
    head) get gradients, never the target's layers: its forward runs under no_grad. (The trainer
    freezes the target, so those two get none either.)"""
    _, target = tiny
    head = _head(target, "qwen3_next")
    ids, mask = _data()
    for p in target.parameters():
        p.requires_grad_(True)
    try:
        out = teacher_forced_chain(target, head, ids, mask, GAMMA)
        out.draft_logits[:, -1].logsumexp(-1).sum().backward()
        assert not out.target_logits.requires_grad
        touched = {n for n, p in target.named_parameters() if p.grad is not None}
        assert touched == {"model.embed_tokens.weight", "lm_head.weight"}
    finally:
        for p in target.parameters():
            p.requires_grad_(False)
            p.grad = None
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_context_is_checked(tiny):
    """An unknown context, and context='serve' on a two-layer head (whose engine caches of
    layers >= 1 hold no step-0 entries), are ValueErrors; 'causal' serves two-layer heads."""
    _, target = tiny
    ids, mask = _data()
    with pytest.raises(ValueError, match="context="):
        teacher_forced_chain(target, _head(target, "qwen3_next"), ids, mask, 2, context="x")
    two = init_mtp_head(target.config, "qwen3_next", 2, seed=0)
    with pytest.raises(ValueError, match="one-layer head"):
        teacher_forced_chain(target, two, ids, mask, 2)
    assert teacher_forced_chain(target, two, ids, mask, 2, context="causal").num_chains > 0


def test_draft_vocab_chain_gives_the_engines_q_and_the_real_acceptance(tiny, tmp_path):
    """With a draft vocabulary of K = 20 of the 48 tokens, the engine (rs, γ = 3, T = 1,
    draft_vocab_size 20) drafts from q = softmax over those 20 logits, 0 elsewhere. The
    training chain's K + 1 columns (train/chain.py draft_vocab_view), put back on the full
    vocabulary, give that q (abs tol 1e-5); Σ_v min(p, q) over the K + 1 columns equals the
    acceptance against the target's full p (abs tol 1e-6); labels map to their column, and
    to IGNORE_LABEL outside the vocabulary."""
    from bebop_spec import LLM, SamplingParams
    from bebop_spec.models.mtp_io import save_draft_vocab
    from bebop_spec.spec.draft_vocab import expand_draft_logits
    from bebop_spec.train.losses import IGNORE_LABEL, chain_alpha

    model_dir, target = tiny
    head = _head(target, "qwen3_next", seed=11)
    ranked = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2)).tolist()
    save_mtp_head(head, tmp_path / "head", "qwen3_next", target.config, torch.float32)
    save_draft_vocab(tmp_path / "head", ranked)
    ids_k = torch.tensor(ranked[:20])
    llm = LLM(str(model_dir), mtp=str(tmp_path / "head"), num_speculative_tokens=GAMMA,
              draft_mode="rs", device="cpu", dtype="float32", max_model_len=64,
              spec_policy="fixed", draft_vocab_size=20)  # fmt: skip
    rounds = _capture_draft_rounds(llm.engine.runner)
    llm.generate([[1, 5, 9, 2]], SamplingParams(temperature=1.0, max_tokens=10, seed=3))
    assert len(rounds) >= 3
    for committed, drafts, q in rounds:
        t = len(committed) - 2
        ids = torch.tensor([committed + drafts])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, t + 2 :] = True
        full = teacher_forced_chain(target, head, ids, mask, GAMMA)
        sub = teacher_forced_chain(target, head, ids, mask, GAMMA, draft_ids=ids_k)
        assert sub.draft_logits.shape == (1, GAMMA, 21)
        q_sub = sub.draft_logits[0, :, :20].detach()
        got = expand_draft_logits(q_sub, ids_k, VOCAB).softmax(-1)
        torch.testing.assert_close(got, q, atol=1e-5, rtol=0)
        p = full.target_logits[0].softmax(-1)
        real = torch.minimum(p, got).sum(-1)
        torch.testing.assert_close(
            chain_alpha(sub.draft_logits, sub.target_logits)[0], real, atol=1e-6, rtol=0
        )
        column = {tok: i for i, tok in enumerate(ids_k.tolist())}
        want = [column.get(int(y), IGNORE_LABEL) for y in full.labels[0]]
        assert sub.labels[0].tolist() == want
