"""Pre-RL MTP trainer (bebop_spec.train.chain / trainer) on a tiny random Qwen3 target.

The target is a 2-layer Qwen3 made with transformers (bebop_spec.testing.make_tiny_model);
the data is self-distilled from it: random prompts, responses sampled from the target at T=1.

Run: python -m pytest -q tests/train/test_trainer.py
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bebop_spec.models import init_mtp_head, load_model
from bebop_spec.testing import make_tiny_model
from bebop_spec.train.chain import teacher_forced_chain
from bebop_spec.train.data import DistillSample, read_dataset, write_dataset
from bebop_spec.train.trainer import (
    TrainConfig,
    evaluate_head,
    plot_training_curve,
    read_log,
    train_mtp,
)

VOCAB, PROMPT, RESPONSE = 32, 4, 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, dataset dir): 12 self-distilled sequences of 4 prompt + 20 response tokens."""
    root = tmp_path_factory.mktemp("trainer")
    model_dir = make_tiny_model(root / "model", vocab_size=VOCAB, hidden_size=32, mtp_layout=None)
    target = load_model(model_dir).target
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (12, PROMPT), generator=gen)
    with torch.no_grad():
        for _ in range(RESPONSE):  # plain sampling at T = 1, no cache (24 tokens)
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            probs = target.compute_logits(target(ids, pos)[:, -1]).softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    mask = [0] * PROMPT + [1] * RESPONSE
    samples = [DistillSample(row.tolist(), mask, "toy") for row in ids]
    write_dataset(root / "data", samples, model=str(model_dir), temperature=1.0)
    return model_dir, root / "data"


def _cfg(tiny, out, **kw) -> TrainConfig:
    model_dir, data_dir = tiny
    base = dict(model=str(model_dir), data=str(data_dir), out=str(out), loss="e2e_tv", gamma=3,
                lr=3e-3, steps=30, batch_size=4, seq_len=32, warmup=3, log_every=1,
                save_every=0, chunk_size=7, seed=0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_chain_counts_exactly_the_complete_chains_and_wires_steps_by_hand(tiny):
    """Row 0: T=8, loss mask 0 0 1 1 1 1 1 1, γ=2 -> start t needs targets t+2, t+3 in the
    mask and t+3 <= 7: starts 0..4. Row 1: mask 0 0 0 1 1 0 0 0 -> only t=1 (targets 3, 4).
    Then every gathered chain is checked against a hand-run of the target and the head:
    target logits at t+k, labels x_{t+k+1}, step-1 pair (h_t, x_{t+1}) at position t, step-2
    pair (g¹_t, x_{t+2}) at position t+1 in a causal pass over starts (abs tol 1e-5). This is
    the older context="causal" chain, kept behind the flag; the default "serve" context is
    checked against the engine in tests/train/test_train_chain.py."""
    model_dir, _ = tiny
    loaded = load_model(model_dir)
    target, head = loaded.target, init_mtp_head(loaded.config, "qwen3_next", 1, seed=3)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out = teacher_forced_chain(target, head, ids, mask, gamma=2, context="causal")
    assert out.starts.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 1]]
    assert out.draft_logits.shape == out.target_logits.shape == (6, 2, VOCAB)
    assert out.mask.all() and not out.target_logits.requires_grad

    pos = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        h = target(ids, pos)
        g1 = head(h[:, :7], ids[:, 1:], pos[:, :7], embed=target.embed)  # starts 0..6
        g2 = head(g1[:, :6], ids[:, 2:], pos[:, 1:7], embed=target.embed, step=1)
    for n, (b, t) in enumerate(out.starts.tolist()):
        assert out.labels[n].tolist() == [ids[b, t + 2].item(), ids[b, t + 3].item()]
        want_p = target.compute_logits(h[b, [t + 1, t + 2]])
        want_q = torch.stack([target.compute_logits(g1[b, t]), target.compute_logits(g2[b, t])])
        torch.testing.assert_close(out.target_logits[n], want_p, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.draft_logits[n].detach(), want_q, atol=1e-5, rtol=0)


def test_e2e_tv_training_lowers_the_loss_and_touches_only_the_head(tiny, tmp_path):
    """30 AdamW steps of e2e TV lower the eval loss (same 4 fixed batches) by > 10% relative,
    raise the accepted length; the target's weights are bit-identical afterwards, and only
    parameters of the head are optimised (its tensors all change)."""
    cfg = _cfg(tiny, tmp_path / "run")
    loaded = load_model(cfg.model)
    before_target = {k: v.clone() for k, v in loaded.target.state_dict().items()}
    fresh = init_mtp_head(loaded.config, cfg.layout, cfg.num_layers, cfg.seed)
    ds = read_dataset(cfg.data)
    before = evaluate_head(cfg, loaded.target, fresh, ds)

    result = train_mtp(cfg)
    after = evaluate_head(cfg, loaded.target, result.head, ds)
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert after["accepted_length"] > before["accepted_length"]

    reloaded = load_model(cfg.model).target.state_dict()
    assert all(torch.equal(before_target[k], reloaded[k]) for k in before_target)
    trained = result.head.state_dict()
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed and set(changed) == {k for k, _ in result.head.named_parameters()}
    assert (result.head_dir / "config.json").is_file()
    served = load_model(cfg.model, mtp=result.head_dir).mtp.state_dict()
    assert all(torch.equal(served[k], v) for k, v in trained.items())

    records = read_log(result.log_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert len(records[-1]["alpha"]) == 3 and records[-1]["num_chains"] > 0
    png = plot_training_curve(result.log_path, tmp_path / "curve.png")
    assert png.stat().st_size > 1000


def test_resume_continues_from_the_checkpoint_exactly(tiny, tmp_path):
    """6 steps straight vs. 3 steps, then a resumed run to 6 (checkpoint every 3 steps):
    same head weights (abs tol 1e-6) and optimiser moments, and one log record per step."""
    straight = train_mtp(_cfg(tiny, tmp_path / "a", steps=6, save_every=3, loss="tv"))
    train_mtp(_cfg(tiny, tmp_path / "b", steps=3, save_every=3, loss="tv"))
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    resumed = train_mtp(_cfg(tiny, tmp_path / "b", steps=6, save_every=3, loss="tv"))
    assert resumed.step == 6
    for k, v in straight.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[k], v, atol=1e-6, rtol=0)
    opt_a = load_file(str(tmp_path / "a" / "checkpoint" / "optimizer.safetensors"))
    opt_b = load_file(str(tmp_path / "b" / "checkpoint" / "optimizer.safetensors"))
    for k, v in opt_a.items():
        torch.testing.assert_close(opt_b[k], v, atol=1e-6, rtol=0)
    assert [r["step"] for r in read_log(resumed.log_path)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="different settings"):
        train_mtp(_cfg(tiny, tmp_path / "b", steps=8, gamma=2, loss="tv"))


def test_bad_inputs_raise_clear_value_errors(tiny, tmp_path):
    """γ < 1, an unknown loss, a head of another hidden size, token ids outside the vocab and
    an empty dataset directory are ValueErrors naming the problem."""
    with pytest.raises(ValueError, match="gamma"):
        _cfg(tiny, tmp_path / "x", gamma=0)
    with pytest.raises(ValueError, match="loss"):
        _cfg(tiny, tmp_path / "x", loss="mse")

    other = make_tiny_model(tmp_path / "other", vocab_size=VOCAB, hidden_size=16)
    with pytest.raises(ValueError, match="hidden_size"):
        train_mtp(_cfg(tiny, tmp_path / "x", init_from=str(other / "mtp")))

    model_dir, _ = tiny
    bad = [DistillSample([1, 2, VOCAB + 5, 3, 4, 5, 6], [0, 1, 1, 1, 1, 1, 1])]
    write_dataset(tmp_path / "bad", bad, model=str(model_dir), temperature=1.0)
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        train_mtp(dataclasses.replace(_cfg(tiny, tmp_path / "x"), data=str(tmp_path / "bad")))

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing data.safetensors"):
        train_mtp(dataclasses.replace(_cfg(tiny, tmp_path / "x"), data=str(tmp_path / "empty")))


def test_bfloat16_target_with_a_float32_head_and_chain_subsampling(tiny, tmp_path):
    """A bf16 target trains a float32 head (cast at the chain's boundaries); max_chains caps
    the chains per batch; the exported head is stored in the configured dtype (bf16)."""
    result = train_mtp(_cfg(tiny, tmp_path / "bf16", steps=2, dtype="bfloat16", max_chains=5))
    assert all(r["num_chains"] == 5 for r in read_log(result.log_path))
    assert all(p.dtype == torch.float32 for p in result.head.parameters())
    exported = load_file(str(result.head_dir / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}


def test_bfloat16_compute_keeps_float32_master_weights(tiny, tmp_path):
    """compute_dtype="bfloat16" autocasts the forward matmuls only: the head's parameters and
    the checkpointed AdamW moments stay float32, and over the same 10 batches the per-step
    losses track the float32 run's within 0.01 (bf16's 8-bit mantissa; measured max |Δ| 2.3e-3)
    without being equal to them (the autocast took effect)."""
    full = train_mtp(_cfg(tiny, tmp_path / "fp32", steps=10))
    half = train_mtp(_cfg(tiny, tmp_path / "bf16", steps=10, compute_dtype="bfloat16"))
    assert all(p.dtype == torch.float32 for p in half.head.parameters())
    moments = load_file(str(tmp_path / "bf16" / "checkpoint" / "optimizer.safetensors"))
    assert {v.dtype for k, v in moments.items() if not k.endswith(".step")} == {torch.float32}
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(full.records, half.records, strict=True)]
    assert 0 < max(deltas) < 0.01, deltas


def test_last_layer_init_and_training_over_a_draft_vocabulary(tiny, tmp_path):
    """init_from="last_layer": before any step the head's decoder layer and final norm equal
    the target's last layer and final norm, and fc = [0 | I] (the hidden passes through).
    Training over a draft vocabulary of 16 of the 32 tokens (lk loss) runs, lowers the loss
    from its first steps and exports the head with that vocabulary as its default size."""
    from bebop_spec.models.mtp_io import draft_vocab_default, load_draft_vocab, save_draft_vocab
    from bebop_spec.train.head_init import init_from_last_layer

    model_dir, _ = tiny
    target = load_model(model_dir).target
    head = init_from_last_layer(init_mtp_head(target.config, "qwen3_next", 1, 0), target)
    _, _, fc, layer, norm = head.parts(0)
    last = target.model.layers[-1]
    for name, value in last.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, atol=0, rtol=0)
    torch.testing.assert_close(norm.weight, target.model.norm.weight, atol=0, rtol=0)
    hidden = target.config.hidden_size
    assert fc.weight[:, :hidden].abs().max() == 0
    torch.testing.assert_close(fc.weight[:, hidden:], torch.eye(hidden), atol=0, rtol=0)

    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    ranked = list(range(VOCAB - 1, -1, -1))
    save_draft_vocab(vocab_dir, ranked)
    result = train_mtp(_cfg(tiny, tmp_path / "run", loss="lk", steps=20, init_from="last_layer",
                            draft_vocab=str(vocab_dir), draft_vocab_size=16))  # fmt: skip
    losses = [r["loss"] for r in read_log(result.log_path)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert draft_vocab_default(result.head_dir) == 16
    assert load_draft_vocab(result.head_dir, 16, VOCAB) == ranked[:16]


def test_snapshots_export_the_head_as_it_was_at_each_step(tiny, tmp_path):
    """snapshot_every=2 over 4 steps exports step_000002 and step_000004 as loadable heads: the
    last equals the final head exactly; the step-2 one is an intermediate state (differs from
    both the final head and the seeded fresh init)."""
    from bebop_spec.train.trainer import snapshot_dir

    cfg = _cfg(tiny, tmp_path / "a", steps=4, snapshot_every=2, loss="tv")
    result = train_mtp(cfg)
    snaps = sorted(p.name for p in (tmp_path / "a" / "snapshots").iterdir())
    assert snaps == ["step_000002", "step_000004"]

    def weights(head_dir):
        return load_model(cfg.model, mtp=head_dir).mtp.state_dict()

    final, last, mid = (weights(d) for d in (result.head_dir, snapshot_dir(cfg.out_dir, 4),
                                               snapshot_dir(cfg.out_dir, 2)))  # fmt: skip
    assert all(torch.equal(last[k], v) for k, v in final.items())
    assert not all(torch.equal(mid[k], v) for k, v in final.items())
    fresh = init_mtp_head(load_model(cfg.model).config, cfg.layout, 1, cfg.seed).state_dict()
    assert not all(torch.equal(mid[k], v.to(mid[k].dtype)) for k, v in fresh.items() if k in mid)
