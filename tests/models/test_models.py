"""Target decoders: config parsing, logits parity with transformers, KV-cache decoding, loading.

Run: pytest tests/models/test_models.py -q   (tiny fp32 models, CPU, a few seconds)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bebop_spec.errors import ModelLoadError
from bebop_spec.models import DenseDecoder, KVCache, ModelConfig, load_model, save_model
from bebop_spec.testing import randomize_weights as randomize

TOL = 1e-4  # max |logit difference| allowed against transformers in fp32

COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def hf_model(kind: str):
    """(transformers model, description) for one parity case."""
    import transformers as tf

    if kind == "qwen3_yarn_untied":
        cfg = tf.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                              "original_max_position_embeddings": 16})  # fmt: skip
        model = tf.Qwen3ForCausalLM(cfg)
    elif kind == "qwen2_linear_tied":
        cfg = tf.Qwen2Config(**COMMON, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "linear", "factor": 2.0})  # fmt: skip
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "llama_llama3_bias":
        cfg = tf.LlamaConfig(**COMMON, attention_bias=True, rope_theta=5e5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16})  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    else:  # plain llama, MQA (1 kv head), tied
        cfg = tf.LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM(cfg)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize(
    "kind", ["qwen3_yarn_untied", "qwen2_linear_tied", "llama_llama3_bias", "llama_mqa_sharded"]
)
def test_logits_match_transformers(kind, tmp_path):
    """Our decoder loaded from save_pretrained gives transformers' logits: max |Δ| < 1e-4 (fp32).

    Cases cover qk-norm (qwen3), qkv bias (qwen2), q/k/v/o bias (llama attention_bias), tied and
    untied LM heads, GQA and MQA, yarn / linear / llama3 RoPE scaling and a sharded checkpoint.
    Positions run past original_max_position_embeddings so the scaled frequencies matter.
    """
    model = hf_model(kind)
    shard = "20KB" if kind.endswith("sharded") else "5GB"
    model.save_pretrained(tmp_path, max_shard_size=shard)
    if kind.endswith("sharded"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path)
    ids = torch.randint(
        0, COMMON["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1)
    )
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        ref = model(ids).logits.float()
        ours = loaded.target.compute_logits(loaded.target(ids, pos))
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < TOL
    assert loaded.mtp is None and loaded.tokenizer is None


@pytest.mark.parametrize("kind", ["qwen3_yarn_untied", "qwen2_linear_tied", "llama_llama3_bias"])
def test_fused_projections_match_and_follow_weight_updates(kind, tmp_path):
    """fuse_projections (one q/k/v and one gate/up matmul, joint q/k norm + rotation) keeps
    transformers' logits (max |Δ| < 1e-4, fp32) through the KV cache with consecutive slots
    (the no-gather read path); an in-place update of q_proj / up_proj is seen by the fused
    matmul; names are unchanged; with grad enabled the separate projections train."""
    from bebop_spec.models.layers import fuse_projections

    model = hf_model(kind)
    model.save_pretrained(tmp_path)
    target = load_model(tmp_path).target
    names = set(target.state_dict())
    fuse_projections(target)
    assert set(target.state_dict()) == names
    ids = torch.randint(
        0, COMMON["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2)
    )
    pos = torch.arange(40).expand(2, 40)

    def cached_logits() -> torch.Tensor:
        cache = KVCache(2, 4, 48, 2, target.config.head_dim)
        slots = torch.tensor([1, 2])  # consecutive: read by slicing the cache
        with torch.inference_mode():
            prefix = target(ids[:, :36], pos[:, :36], cache, slots)
            steps = [
                target(ids[:, t : t + 1], pos[:, t : t + 1], cache, slots) for t in range(36, 40)
            ]
            return target.compute_logits(torch.cat([prefix, *steps], 1))

    with torch.no_grad():
        assert (cached_logits() - model(ids).logits).abs().max().item() < TOL
        g = torch.Generator().manual_seed(5)
        for ours, theirs in ((target.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj),
                             (target.model.layers[1].mlp.up_proj, model.model.layers[1].mlp.up_proj)):  # fmt: skip
            new = torch.randn(ours.weight.shape, generator=g) * 0.2
            ours.weight.copy_(new)
            theirs.weight.copy_(new)
        assert (cached_logits() - model(ids).logits).abs().max().item() < TOL
    target.compute_logits(target(ids, pos)).sum().backward()  # grad on: unfused path
    assert target.model.layers[0].self_attn.q_proj.weight.grad is not None


# ------------------------------------------------------------------------------------ config
def test_config_reads_v5_and_legacy_rope_keys():
    """`rope_parameters` (transformers 5) and `rope_theta` + `rope_scaling` parse identically."""
    base = {**COMMON, "model_type": "llama"}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3",
                                                          "rope_theta": 5e5, **scaling}})  # fmt: skip
    legacy = ModelConfig.from_hf({**base, "rope_theta": 5e5,
                                  "rope_scaling": {"type": "llama3", **scaling}})  # fmt: skip
    assert v5 == legacy and v5.rope_theta == 5e5 and v5.rope_type == "llama3"
    plain = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 1e6}})  # fmt: skip
    assert plain.rope_scaling is None and plain.rope_theta == 1e6 and plain.head_dim == 8
    q2 = ModelConfig.from_hf({**COMMON, "model_type": "qwen2", "eos_token_id": [5, 6]})
    assert q2.attention_bias and not q2.o_proj_bias and q2.eos_token_ids == [5, 6]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "unsupported model"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"use_sliding_window": True}, "sliding"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_rejects_what_we_cannot_run(change, message):
    """Unsupported configs (model type, kv heads not dividing the heads, dynamic RoPE, llama3 RoPE
    without its factors, sliding window, non-SiLU activation, empty vocab) raise a ValueError
    naming the problem."""
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**COMMON, "model_type": "qwen3", **change})


def test_config_detects_mtp_layouts():
    """mtp_num_hidden_layers marks the qwen3_next MTP layout and num_nextn_predict_layers the
    deepseek_v3 one, each with its layer count."""
    qn = ModelConfig.from_hf({**COMMON, "model_type": "qwen3", "mtp_num_hidden_layers": 1})
    ds = ModelConfig.from_hf({**COMMON, "model_type": "qwen3", "num_nextn_predict_layers": 2})
    assert (qn.mtp_layout, qn.mtp_num_layers) == ("qwen3_next", 1)
    assert (ds.mtp_layout, ds.mtp_num_layers) == ("deepseek_v3", 2)


# -------------------------------------------------------------------------------- KV cache
def tiny_target(seed: int = 0, **overrides) -> DenseDecoder:
    cfg = ModelConfig.from_hf({**COMMON, "model_type": "qwen3", "head_dim": 8, **overrides})
    torch.manual_seed(seed)
    model = DenseDecoder(cfg)
    randomize(model, seed)
    return model.eval()


def reference(model: DenseDecoder, seq: list[int]) -> torch.Tensor:
    """Hidden states of one sequence by a plain causal forward: [len, H]."""
    ids = torch.tensor([seq])
    return model(ids, torch.arange(len(seq))[None])[0]


@torch.no_grad()
def test_incremental_decoding_matches_full_forward():
    """Padded multi-slot prefill, a ragged multi-token step, then token-by-token decoding
    through the KVCache reproduce a no-cache forward of each sequence (max |Δ| < 1e-5)."""
    model = tiny_target()
    cache = KVCache(2, 5, 32, 2, 8, torch.float32, "cpu")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (7, 3, 5)]
    slots = torch.tensor([4, 0, 2])  # rows use non-contiguous slots

    def step(chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        width = max(len(c) for c in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        pos = torch.full((len(chunks), width), cache.scratch)
        for b, (c, s) in enumerate(zip(chunks, starts, strict=True)):
            ids[b, : len(c)] = torch.tensor(c)
            pos[b, : len(c)] = torch.arange(s, s + len(c))
        return model(ids, pos, cache, slots)

    out = step(seqs, [0, 0, 0])
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out[b, : len(s)], reference(model, s), atol=1e-5, rtol=0)
    extra = [[1, 2], [3, 4, 5, 6], [7]]  # ragged verify-like step
    out = step(extra, [len(s) for s in seqs])
    for b, (s, e) in enumerate(zip(seqs, extra, strict=True)):
        torch.testing.assert_close(out[b, : len(e)], reference(model, s + e)[len(s):],
                                   atol=1e-5, rtol=0)  # fmt: skip
        s += e
    for t in range(3):  # token by token
        new = [[(11 * t + b) % 61] for b in range(3)]
        out = step(new, [len(s) for s in seqs])
        for b, s in enumerate(seqs):
            s += new[b]
            torch.testing.assert_close(out[b, 0], reference(model, s)[-1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_rollback_by_overwriting_positions():
    """After truncating a sequence, writing new tokens at the freed positions gives the hidden
    states of the new sequence: stale cache entries beyond the query are never read."""
    model = tiny_target(seed=1)
    cache = KVCache(2, 2, 16, 2, 8)
    seq = list(range(10, 20))
    model(torch.tensor([seq]), torch.arange(10)[None], cache, torch.tensor([1]))
    kept = seq[:6]  # reject the last 4
    new = [40, 41, 42]
    out = model(torch.tensor([new]), torch.arange(6, 9)[None], cache, torch.tensor([1]))
    torch.testing.assert_close(out[0], reference(model, kept + new)[6:], atol=1e-5, rtol=0)


def test_kv_cache_rejects_bad_addresses():
    """A position past the scratch column or a slot past num_slots is a ValueError; a valid view
    reads keys up to the furthest real position (padding excluded), mask [B, 1, T, kv_len]."""
    cache = KVCache(1, 2, 8, 1, 4)
    with pytest.raises(ValueError, match="positions"):
        cache.view(torch.tensor([0]), torch.tensor([[9]]))
    with pytest.raises(ValueError, match="slots"):
        cache.view(torch.tensor([2]), torch.tensor([[0]]))
    view = cache.view(torch.tensor([0, 1]), torch.tensor([[0, 1], [3, cache.scratch]]))
    assert view.kv_len == 4 and view.mask.shape == (2, 1, 2, 4)


# ---------------------------------------------------------------------------------- loading
def test_save_model_round_trip_and_tokenizer(tmp_path):
    """save_model → load_model reproduces the weights exactly; tokenizer files are picked up."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_target(seed=2, tie_word_embeddings=True)
    save_model(model, tmp_path)
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    loaded = load_model(tmp_path)
    assert loaded.tokenizer is not None and loaded.config.eos_token_ids == [3, 4]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.target.state_dict()[k]), k
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.target.model.embed_tokens.weight.dtype == torch.bfloat16


def _edit_weights(directory, fn) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        (lambda t: t.update({"model.norm.weight": torch.ones(33)}),
         r"'model.norm.weight' has shape \[33\].*expected \[32\]"),
        (lambda t: t.update({"model.extra.weight": torch.ones(2)}), "model.extra.weight"),
    ],
)  # fmt: skip
def test_bad_checkpoints_raise_model_load_error(edit, message, tmp_path):
    """Missing, mis-shaped and unexpected tensors are named in a ModelLoadError."""
    save_model(tiny_target(), tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path)


def test_missing_directory_and_config(tmp_path):
    """Loading a nonexistent directory, or one without config.json, raises ModelLoadError
    saying so."""
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 4])
def test_cached_attention_folds_gqa_groups_exactly(dtype, t):
    """Invariant: cached_attention (GQA groups folded into the query axis) equals SDPA with
    enable_gqa over the same cached keys: rows of different lengths, a per-row causal mask,
    9 query / 3 kv heads, decode (T = 1) and verify (T = 4) shapes, float32 and bfloat16
    (tolerance: 1e-5 float32, 1e-2 bfloat16, the rounding of a bf16 softmax·V)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from bebop_spec.models.layers import cached_attention

    gen = torch.Generator().manual_seed(0)
    b, h, kv, d, keys = 3, 9, 3, 16, 20
    q = torch.randn(b, h, t, d, generator=gen).to(dtype)
    k = torch.randn(b, kv, keys, d, generator=gen).to(dtype)
    v = torch.randn(b, kv, keys, d, generator=gen).to(dtype)
    last = torch.tensor([7, 19, 12])[:, None] - t + 1 + torch.arange(t)  # [B, T] positions
    mask = (torch.arange(keys)[None, None, :] <= last[:, :, None])[:, None]  # [B, 1, T, L]
    expected = sdpa(q, k, v, attn_mask=mask, enable_gqa=True).float()
    got = cached_attention(q, k, v, mask).float()
    assert got.shape == (b, h, t, d)
    assert (got - expected).abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)
    unmasked = cached_attention(q, k, v, None).float()
    assert (unmasked - sdpa(q, k, v, enable_gqa=True).float()).abs().max() < 1e-2
