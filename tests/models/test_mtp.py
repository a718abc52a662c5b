"""MTP head: layouts and names, save/load round trips, chained drafting through the KV cache.

Run: pytest tests/models/test_mtp.py -q   (tiny fp32 models, CPU, a few seconds)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bebop_spec.errors import ModelLoadError
from bebop_spec.models import (
    KVCache,
    ModelConfig,
    init_mtp_head,
    load_model,
    load_mtp_head,
    save_model,
    save_mtp_head,
)
from bebop_spec.models.decoder import DenseDecoder
from bebop_spec.models.layers import RMSNorm
from bebop_spec.testing import randomize_weights as randomize

LAYOUTS = ["qwen3_next", "deepseek_v3"]
COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def tiny_target(seed: int = 0) -> DenseDecoder:
    cfg = ModelConfig.from_hf({**COMMON, "model_type": "qwen3", "head_dim": 8})
    model = DenseDecoder(cfg)
    randomize(model, seed)
    return model.eval()


def random_head(config: ModelConfig, layout: str, num_layers: int = 1, seed: int = 5):
    head = init_mtp_head(config, layout, num_layers, seed=seed)
    randomize(head, seed)  # init is near-identity; random weights make every tensor count
    return head.eval()


def inputs(target, batch: int = 2, length: int = 9, seed: int = 0):
    """(hidden[B,T,H] of the target, next_ids[B,T], positions[B,T]) for pairs (h_j, x_{j+1})."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, COMMON["vocab_size"], (batch, length + 1), generator=g)
    pos = torch.arange(length).expand(batch, length)
    with torch.no_grad():
        hidden = target(ids[:, :-1], pos)
    return hidden, ids[:, 1:], pos


def test_layout_names_follow_vllm():
    """Checkpoint names, shapes and norm styles of both layouts (docs/mtp_layout.md)."""
    cfg = tiny_target().config
    h = cfg.hidden_size
    qn = init_mtp_head(cfg, "qwen3_next", 2).state_dict()
    assert qn["mtp.fc.weight"].shape == (h, 2 * h)
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        assert torch.equal(qn[f"mtp.{name}.weight"], torch.zeros(h))  # zero-centred: 1 + w
    assert (
        "mtp.layers.1.self_attn.q_norm.weight" in qn and "mtp.layers.2.mlp.up_proj.weight" not in qn
    )
    ds = init_mtp_head(cfg, "deepseek_v3", 1).state_dict()
    n = cfg.num_hidden_layers
    assert ds[f"model.layers.{n}.eh_proj.weight"].shape == (h, 2 * h)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        assert torch.equal(ds[f"model.layers.{n}.{name}.weight"], torch.ones(h))  # standard: w
    assert f"model.layers.{n}.self_attn.k_proj.weight" in ds


def test_zero_centered_norm_is_one_plus_w():
    """A zero-centred RMSNorm with weight w computes what a standard RMSNorm with weight
    1 + w does."""
    w = torch.randn(8)
    zc, std = RMSNorm(8, zero_centered=True), RMSNorm(8)
    with torch.no_grad():
        zc.weight.copy_(w)
        std.weight.copy_(1 + w)
    x = torch.randn(3, 8)
    torch.testing.assert_close(zc(x), std(x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_separate_and_mixed(layout, tmp_path):
    """save → load in a separate directory and mixed into the target checkpoint both give
    bit-identical outputs (fp32), and load_model picks the mixed head up by itself."""
    target = tiny_target()
    head = random_head(target.config, layout)
    hidden, nxt, pos = inputs(target)
    with torch.no_grad():
        want = head(hidden, nxt, pos, embed=target.embed)

    sep = save_mtp_head(
        head, tmp_path / "head", layout, target.config, torch.float32, target=target
    )
    hf = json.loads((sep / "config.json").read_text())
    key = "mtp_num_hidden_layers" if layout == "qwen3_next" else "num_nextn_predict_layers"
    assert hf[key] == 1 and hf["hidden_size"] == COMMON["hidden_size"]
    tdir = save_model(target, tmp_path / "target")
    save_mtp_head(head, tdir, into_target=True)
    assert (tdir / "model.safetensors.index.json").is_file()

    from_sep = load_model(tdir, mtp=sep).mtp
    mixed = load_model(tdir)  # config.json now declares the head
    assert mixed.mtp is not None and mixed.mtp.layout == layout
    assert load_model(tdir, mtp=False).mtp is None
    for loaded_head in (from_sep, mixed.mtp, load_mtp_head(sep, target.config)):
        with torch.no_grad():
            got = loaded_head(hidden, nxt, pos, embed=mixed.target.embed)
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_chain_through_cache_matches_no_cache(layout):
    """Prefill pairs (h_j, x_{j+1}) at positions 0..n-1 for two slots of different lengths
    (padding via the scratch column), then γ=3 chained steps feeding (g_{k-1}, d_k) at position
    n-1+k: every output equals a no-cache forward over all pairs so far (max |Δ| < 1e-5)."""
    target = tiny_target()
    head = random_head(target.config, layout)
    cache = KVCache(1, 3, 32, 2, 8)
    hidden, nxt, pos = inputs(target, batch=2, length=8)
    lens = [8, 5]
    pos = pos.clone()
    pos[1, lens[1] :] = cache.scratch
    slots = torch.tensor([2, 0])
    g = head(hidden, nxt, pos, cache, slots, embed=target.embed)

    def no_cache(h, x):  # one sequence of pairs at positions 0..len-1
        return head(h[None], x[None], torch.arange(h.shape[0])[None], embed=target.embed)[0]

    seq_h = [hidden[b, :n] for b, n in enumerate(lens)]
    seq_x = [nxt[b, :n] for b, n in enumerate(lens)]
    for b in range(2):
        torch.testing.assert_close(g[b, : lens[b]], no_cache(seq_h[b], seq_x[b]), atol=1e-5, rtol=0)
    last = torch.stack([g[b, n - 1] for b, n in enumerate(lens)])
    for k in range(1, 4):
        drafts = torch.tensor([3 * k, 7 * k])
        step_pos = torch.tensor([[n - 1 + k] for n in lens])
        out = head(last[:, None], drafts[:, None], step_pos, cache, slots,
                   embed=target.embed, step=k)[:, 0]  # fmt: skip
        for b in range(2):
            seq_h[b] = torch.cat([seq_h[b], last[b][None]])
            seq_x[b] = torch.cat([seq_x[b], drafts[b : b + 1]])
            torch.testing.assert_close(out[b], no_cache(seq_h[b], seq_x[b])[-1], atol=1e-5, rtol=0)
        last = out


@torch.no_grad()
def test_step_selects_layer_modulo_num_layers():
    """Chain step k uses MTP layer k % num_layers (vLLM's spec_step_idx % num_mtp_layers)."""
    target = tiny_target()
    head = random_head(target.config, "qwen3_next", num_layers=2)
    hidden, nxt, pos = inputs(target)
    outs = [head(hidden, nxt, pos, embed=target.embed, step=k) for k in range(3)]
    assert torch.equal(outs[0], outs[2]) and not torch.allclose(outs[0], outs[1])


@torch.no_grad()
def test_deepseek_zeroes_embedding_at_position_zero():
    """deepseek_v3 ignores the token at position 0 (vLLM deepseek_mtp.py); qwen3_next does not."""
    target = tiny_target()
    hidden, nxt, pos = inputs(target, batch=1)
    other = nxt.clone()
    other[0, 0] = (other[0, 0] + 1) % COMMON["vocab_size"]
    for layout, same in (("deepseek_v3", True), ("qwen3_next", False)):
        head = random_head(target.config, layout)
        a = head(hidden, nxt, pos, embed=target.embed)[0, 0]
        b = head(hidden, other, pos, embed=target.embed)[0, 0]
        assert torch.equal(a, b) == same, layout


def test_save_refuses_another_layout(tmp_path):
    """Saving a qwen3_next head under the deepseek_v3 layout raises ValueError ("not
    interchangeable")."""
    head = random_head(tiny_target().config, "qwen3_next")
    with pytest.raises(ValueError, match="not interchangeable"):
        save_mtp_head(head, tmp_path, "deepseek_v3")


# ------------------------------------------------------------------------------ bad inputs
def _saved_head(tmp_path, layout="qwen3_next"):
    target = tiny_target()
    head = random_head(target.config, layout)
    return target.config, save_mtp_head(head, tmp_path / "head", layout, target.config)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("mtp.layers.0.self_attn.k_norm.weight"),
         "missing tensor 'mtp.layers.0.self_attn.k_norm.weight'"),
        (lambda t: t.update({"mtp.layers.0.mlp.down_proj.weight": torch.zeros(32, 40)}),
         r"'mtp.layers.0.mlp.down_proj.weight' has shape \[32, 40\].*expected \[32, 48\]"),
        (lambda t: t.update({"mtp.layers.1.mlp.up_proj.weight": torch.zeros(1)}),
         "unexpected tensor.*mtp.layers.1.mlp.up_proj.weight"),
    ],
)  # fmt: skip
def test_bad_head_checkpoints(edit, message, tmp_path):
    """Missing, mis-shaped and unexpected head tensors raise ModelLoadError naming them."""
    config, directory = _saved_head(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        load_mtp_head(directory, config)


def test_head_for_another_target_is_refused(tmp_path):
    """A head saved for hidden_size 48 does not load onto a hidden_size-32 target."""
    _, directory = _saved_head(tmp_path, "deepseek_v3")
    wide = ModelConfig.from_hf({**COMMON, "model_type": "qwen3", "head_dim": 8,
                                "hidden_size": 48})  # fmt: skip
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, "hidden_size": 48}))
    with pytest.raises(ModelLoadError, match="hidden_size mismatch"):
        load_mtp_head(directory, tiny_target().config)
    (directory / "config.json").unlink()  # no config: the tensor shapes still catch it
    with pytest.raises(ModelLoadError, match="hidden_size mismatch.*eh_proj.weight"):
        load_mtp_head(directory, wide)


def test_mixing_twice_is_refused(tmp_path):
    """A target that already carries MTP tensors in its own shards is not silently doubled."""
    target = tiny_target()
    tdir = save_model(target, tmp_path / "t")
    head = random_head(target.config, "qwen3_next")
    _edit = load_file(tdir / "model.safetensors")
    _edit.update({k: v.contiguous() for k, v in head.state_dict().items()})
    save_file(_edit, tdir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="already holds MTP tensors"):
        save_mtp_head(head, tdir, into_target=True)
    with pytest.raises(ModelLoadError, match="no MTP head"):
        load_mtp_head(save_model(target, tmp_path / "plain"), target.config)
