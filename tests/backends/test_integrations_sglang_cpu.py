"""Unit tests of the patched SGLang 0.5.23 code, on CPU.

Run inside an interpreter that imports the *patched* SGLang tree (see
`python -m tools.engine_sources sglang`); tests/backends/test_integrations_engines.py
launches them that way. Elsewhere they skip.

Invariants guarded:
- The patched draft proposal (`sample_draft_proposal`, `renorm_draft_probs`) returns q equal
  to the target's processing in eagle_sample on the same logits: softmax(logits / T), then
  top-k renormalisation, then top-p renormalisation (reference written from DESIGN §2;
  on CPU SGLang has no renorm kernels, so both sides use bebop's torch rendering; on a GPU
  both call FlashInfer's kernels).
- Drafts are sampled from that q: 2,000 draws per row never leave its support; greedy
  rows (top_k = 1) propose the argmax.
- Chain-verification bookkeeping (entropy buckets, per-position counts) and its
  Prometheus export; the SGLang request/response types the backend builds.
- Dense-target heads (patch 0003): an exported Bebop head's config is rewritten to
  BebopDenseForCausalLMMTP for draft models only, and the registry resolves it; the model
  builds on CPU for Qwen3 / Qwen2 / Llama, every tensor of a `bebop_spec` head loads into
  it (q/k/v and gate/up stacked, target tensors skipped), its zero-centred norms, fc input,
  q/k/v and MLP compute what Bebop's head computes, forward feeds the layer stack with
  fc(cat(enorm(embed), hnorm(spec hidden))), embed / LM head are swapped for the target's;
  the dense targets skip mixed-in `mtp.*` tensors.
"""

from __future__ import annotations

import math
import types

import pytest

torch = pytest.importorskip("torch")
bebop = pytest.importorskip(
    "sglang.srt.speculative.bebop", reason="needs the patched SGLang tree on sys.path"
)
pytestmark = pytest.mark.sglang

from sglang.srt.speculative import spec_utils  # noqa: E402

V = 48


def _reference_p(logits, temps, top_ks, top_ps):
    """p = top_p(top_k(softmax(logits / T))), renormalised after each cut (DESIGN §2)."""
    probs = torch.softmax(logits / temps.view(-1, 1), dim=-1)
    out = []
    for row, k, p in zip(probs, top_ks.tolist(), top_ps.tolist(), strict=True):
        order = torch.argsort(row, descending=True)
        keep = torch.zeros_like(row, dtype=torch.bool)
        keep[order[: min(k, V)]] = True
        row = torch.where(keep, row, 0.0)
        row = row / row.sum()
        sorted_p = row[order]
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        keep2 = torch.zeros_like(keep)
        keep2[order] = mass_before < p
        row = torch.where(keep2 & keep, row, 0.0)
        out.append(row / row.sum())
    return torch.stack(out)


def _case(seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(5, V) * 3
    temps = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.9]).view(-1, 1)
    top_ks = torch.tensor([5, 1 << 30, 12, 1, 7], dtype=torch.int32)
    top_ps = torch.tensor([1.0, 0.8, 0.5, 1.0, 0.9])
    return logits, temps, top_ks, top_ps


@pytest.fixture(autouse=True)
def _cpu_argmax(monkeypatch):
    """fast_sample's fp32 row_argmax is a Triton kernel; torch argmax is the same rule."""
    monkeypatch.setattr(spec_utils, "row_argmax", lambda x: x.argmax(dim=-1))


def test_sample_draft_proposal_q_equals_target_processing():
    """sample_draft_proposal's q equals top-p(top-k(softmax(logits / T))) within 1e-6 with the same
    support, q_x is q at the drafts, a top_k = 1 row drafts the argmax, and q differs from the
    unpatched temperature-only softmax."""
    logits, temps, top_ks, top_ps = _case()
    q, q_x, x = spec_utils.sample_draft_proposal(logits.clone(), temps, top_ks, top_ps=top_ps)
    p = _reference_p(logits, temps, top_ks, top_ps)
    torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert torch.equal(q > 0, p > 0)
    assert torch.equal(q_x, q.gather(1, x))
    assert x[3].item() == logits[3].argmax().item(), "top_k = 1 proposes the argmax"
    unpatched = torch.softmax(logits / temps, dim=-1)
    assert not torch.allclose(q, unpatched)


def test_renorm_draft_probs_follows_the_target_flags():
    """renorm_draft_probs applies top-k / top-p only when the target's flags ask for them (else
    softmax(logits / T)); without rejection sampling q is plain softmax(logits)."""
    logits, temps, top_ks, top_ps = _case(1)
    info = types.SimpleNamespace(temperatures=temps, top_ks=top_ks, top_ps=top_ps,
                                 need_top_k_sampling=True, need_top_p_sampling=True)  # fmt: skip
    q = spec_utils.renorm_draft_probs(logits, info, use_rejection_sampling=True)
    torch.testing.assert_close(q, _reference_p(logits, temps, top_ks, top_ps), rtol=0, atol=1e-6)
    info.need_top_k_sampling = info.need_top_p_sampling = False  # the target skips both
    q = spec_utils.renorm_draft_probs(logits, info, use_rejection_sampling=True)
    torch.testing.assert_close(q, torch.softmax(logits / temps, -1))
    plain = spec_utils.renorm_draft_probs(logits, info, use_rejection_sampling=False)
    torch.testing.assert_close(plain, torch.softmax(logits, -1))


def test_draft_samples_stay_in_processed_support():
    """2,000 drafts per row from sample_draft_proposal all have q > 0: none leaves the processed
    support."""
    logits, temps, top_ks, top_ps = _case(2)
    reps = 400
    for _ in range(5):  # 2,000 draws per row
        q, _, x = spec_utils.sample_draft_proposal(
            logits.repeat(reps, 1),
            temps.repeat(reps, 1),
            top_ks.repeat(reps),
            top_ps=top_ps.repeat(reps),
        )
        assert (q.gather(1, x) > 0).all()


def test_draft_top_ps_helper():
    """draft_top_ps is None when the target skips top-p sampling, else the batch's top_ps tensor."""
    info = types.SimpleNamespace(top_ps=torch.ones(2), need_top_p_sampling=False)
    assert bebop.draft_top_ps(info) is None
    info.need_top_p_sampling = True
    assert bebop.draft_top_ps(info) is info.top_ps


def test_chain_verification_stats_and_prometheus():
    """Chain verifications (3 uniform-q rows accepting 2, 0, 1 drafts; 1 greedy row, H = 0) reach
    Prometheus as verified / accepted counts per entropy bucket and per position and as the
    entropy count (8); logging drains the recorder."""
    import prometheus_client

    rec = bebop.RECORDER
    rec.drain()
    bs, gamma = 3, 2
    uniform = torch.full((bs, gamma + 1, V), 1.0 / V)
    bebop.observe_chain_verification(uniform, torch.tensor([2, 0, 1]), bs, gamma + 1)
    bebop.observe_chain_verification(None, torch.tensor([1]), 1, gamma + 1)  # greedy: H = 0
    metrics = bebop.BebopSpecMetrics(
        {"model_name": "m"}, prometheus_client.Counter, prometheus_client.Histogram
    )
    metrics.log()
    text = prometheus_client.generate_latest().decode()
    b = int(torch.bucketize(torch.tensor(math.log(V)), torch.tensor(bebop.ENTROPY_BUCKET_EDGES)))
    le = metrics.entropy_labels[b]
    assert (
        f'sglang:bebop_spec_num_verified_tokens_by_entropy_total{{entropy_le="{le}",model_name="m"}} 6.0'
        in text
    )
    assert (
        f'sglang:bebop_spec_num_accepted_tokens_by_entropy_total{{entropy_le="{le}",model_name="m"}} 3.0'
        in text
    )
    assert (
        'sglang:bebop_spec_num_verified_tokens_per_pos_total{model_name="m",position="0"} 4.0'
        in text
    )
    assert (
        'sglang:bebop_spec_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 3.0'
        in text
    )
    assert (
        'sglang:bebop_spec_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 1.0'
        in text
    )
    assert 'sglang:bebop_spec_target_entropy_count{model_name="m"} 8.0' in text
    assert rec.drain() is None


def test_torch_renorm_matches_reference_ties_and_edges():
    """torch top-k renorm keeps every token tied at the k-th value; top-p keeps the tokens whose
    preceding mass is below p; top_p = 1 only renormalises."""
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]])
    k = bebop.torch_top_k_renorm(probs, torch.tensor([2]))
    assert torch.allclose(
        k, torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.0]])
    )  # ties at the k-th value kept
    p = bebop.torch_top_p_renorm(probs, torch.tensor([0.5]))
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0, 0.0]]))
    assert torch.equal(bebop.torch_top_p_renorm(probs, torch.tensor([1.0])), probs / probs.sum())


def test_backend_request_types_are_sglangs():
    """The backend's sampling dict builds and verifies a real SGLang SamplingParams; SGLang's pause
    and weight-update request types accept every pause mode, the selector and a version."""
    from sglang.srt.managers.io_struct import (
        PauseGenerationReqInput,
        UpdateWeightsFromTensorReqInput,
    )
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    from bebop_spec.backends import sglang as sglang_backend
    from bebop_spec.engine.config import PAUSE_MODES
    from bebop_spec.sampling_params import SamplingParams

    d = sglang_backend.sampling_params_dict(
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, stop=["x"], seed=3)
    )
    sp = SGLSamplingParams(**d)
    sp.verify(1000)
    assert (sp.top_k, sp.top_p, sp.min_p) == (20, 0.9, 0.05)
    for mode in PAUSE_MODES:
        assert PauseGenerationReqInput(mode=mode).mode == mode
    req = UpdateWeightsFromTensorReqInput(
        serialized_named_tensors=[b""], selector="draft", weight_version="v7"
    )
    assert (req.selector, req.weight_version) == ("draft", "v7")


PATCHED_MODULES = [
    "sglang.srt.speculative.bebop",
    "sglang.srt.speculative.spec_utils",
    "sglang.srt.speculative.eagle_utils",
    "sglang.srt.speculative.eagle_worker_v2",
    "sglang.srt.speculative.eagle_draft_cuda_graph_runner",
    "sglang.srt.speculative.multi_layer_eagle_worker_v2",
    "sglang.srt.speculative.multi_layer_eagle_draft_extend_cuda_graph_runner",
    "sglang.srt.observability.metrics_collector",
    "sglang.srt.models.bebop_dense_mtp",
    "sglang.srt.configs.model_config",
    "sglang.srt.models.qwen3",
    "sglang.srt.models.qwen2",
    "sglang.srt.models.llama",
]


@pytest.mark.parametrize("name", PATCHED_MODULES)
def test_patched_module_imports_on_cpu(name):
    """Each patched SGLang module (one per parameter) imports on CPU."""
    import importlib

    importlib.import_module(name)


# ---------------------------------------------------------------- dense-target MTP heads
H, FFN, NH, NKV, D = 32, 48, 4, 2, 8


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sglang_cpu_layers():
    """What building SGLang layers on CPU needs: published CPU server args, a one-rank gloo
    group, the ranks stamped, and RotaryEmbedding's torch path (it picks vLLM's CUDA op on
    a non-CUDA host unless SGLang's CPU engine, which needs sgl_kernel, is on)."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.layers.rotary_embedding import base as rope_base
    from sglang.srt.runtime_context import derive_spawn_ranks, get_context, get_parallel

    override = get_context().override_server_args(device="cpu")
    override.install()
    if not ps.model_parallel_is_initialized():
        ps.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
        )  # fmt: skip
        ps.initialize_model_parallel(backend="gloo")
    ranks = derive_spawn_ranks(world_rank=0, tp_size=1, ep_join_rank_offset=0, attn_cp_size=1,
                               attn_tp_size=1, moe_dp_size=1, moe_ep_size=1)  # fmt: skip
    get_parallel().override_permanently(**ranks)
    was_cpu, rope_base._is_cpu = rope_base._is_cpu, True
    yield
    rope_base._is_cpu = was_cpu
    override.restore()


def _hf_config(family: str):
    import transformers

    cls = {"qwen3": "Qwen3Config", "qwen2": "Qwen2Config", "llama": "LlamaConfig"}[family]
    arch = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    hf = dict(vocab_size=64, hidden_size=H, intermediate_size=FFN, num_hidden_layers=2,
              num_attention_heads=NH, num_key_value_heads=NKV, head_dim=D,
              max_position_embeddings=128, rms_norm_eps=1e-6, architectures=[arch[family]])  # fmt: skip
    return hf, getattr(transformers, cls)(**hf)


def _bebop_head(family: str):
    """A random Bebop head (qwen3_next layout, one layer) and its exported draft config."""
    from bebop_spec.models.config import ModelConfig
    from bebop_spec.models.mtp import MTPHead

    hf, cfg = _hf_config(family)
    torch.manual_seed(5)
    head = MTPHead(ModelConfig.from_hf({**hf, "model_type": family}), "qwen3_next", 1)
    for prm in head.parameters():
        prm.data.normal_(0, 0.2)
    cfg.mtp_num_hidden_layers = 1  # what `bebop mtp export --layout qwen3_next` adds
    return head, cfg


def _draft_rewrite(cfg, is_draft_model=True):
    from sglang.srt.configs.model_config import ModelConfig

    view = types.SimpleNamespace(is_draft_model=is_draft_model, hf_config=cfg,
                                 hf_text_config=cfg, speculative_algorithm="EAGLE")  # fmt: skip
    ModelConfig._config_draft_model(view)
    return view.hf_config


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_dense_head_config_maps_to_bebop_mtp(family):
    """A draft config with mtp_num_hidden_layers is rewritten to BebopDenseForCausalLMMTP (target
    architecture kept, 1 nextn layer), which the registry resolves; a plain draft config and
    the target's own config keep their architecture."""
    from sglang.srt.models.bebop_dense_mtp import BebopDenseForCausalLMMTP
    from sglang.srt.models.registry import ModelRegistry

    _, cfg = _bebop_head(family)
    target_arch = cfg.architectures[0]
    out = _draft_rewrite(cfg)
    assert out.architectures == ["BebopDenseForCausalLMMTP"]
    assert (out.bebop_target_architecture, out.num_nextn_predict_layers) == (target_arch, 1)
    assert ModelRegistry.resolve_model_cls(out.architectures)[0] is BebopDenseForCausalLMMTP
    _, plain = _hf_config(family)  # an ordinary draft model: untouched
    assert _draft_rewrite(plain).architectures == [target_arch]
    _, target = _bebop_head(family)  # the target itself (--into-target dir): untouched
    assert _draft_rewrite(target, is_draft_model=False).architectures == [target_arch]


def _build(cfg):
    from sglang.srt.models.bebop_dense_mtp import BebopDenseForCausalLMMTP

    return BebopDenseForCausalLMMTP(_draft_rewrite(cfg)).float()


def _checkpoint(head):
    """The head's tensors plus what a head dir / mixed-in target dir also holds."""
    ckpt = dict(head.state_dict())
    ckpt["model.embed_tokens.weight"] = torch.randn(64, H)  # shared copies
    ckpt["lm_head.weight"] = torch.randn(64, H)
    ckpt["model.layers.0.mlp.up_proj.weight"] = torch.randn(FFN, H)  # a target tensor: skipped
    ckpt["model.norm.weight"] = torch.randn(H)
    return ckpt


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_dense_head_loads_every_tensor_and_matches_bebop(sglang_cpu_layers, family):
    """Every parameter loads from a Bebop head checkpoint (target tensors skipped); norms, fc,
    stacked q/k/v and gate/up, o_proj (and qwen3 q/k norms) match Bebop's head; the embedding
    is the checkpoint's."""
    head, cfg = _bebop_head(family)
    model = _build(cfg)
    ckpt = _checkpoint(head)
    loaded = model.load_weights(ckpt.items())
    assert loaded == {n for n, _ in model.named_parameters()}, "every parameter comes from the head"
    enorm, hnorm, fc, layer, norm = head.parts(0)
    lin = torch.nn.functional.linear
    x = torch.randn(5, H)
    with torch.no_grad():
        torch.testing.assert_close(model.pre_fc_norm_embedding.forward_native(x), enorm(x))
        torch.testing.assert_close(model.pre_fc_norm_hidden.forward_native(x), hnorm(x))
        torch.testing.assert_close(model.model.norm.forward_native(x), norm(x))  # (1 + w)·x̂
        torch.testing.assert_close(model.fc(torch.cat([x, x], -1)), fc(torch.cat([x, x], -1)))
        sl = model.model.layers[0]
        torch.testing.assert_close(sl.input_layernorm.forward_native(x), layer.input_layernorm(x))
        torch.testing.assert_close(
            sl.post_attention_layernorm.forward_native(x), layer.post_attention_layernorm(x)
        )
        g, u = lin(x, sl.mlp.gate_up_proj.weight).chunk(2, dim=-1)
        torch.testing.assert_close(
            lin(torch.nn.functional.silu(g) * u, sl.mlp.down_proj.weight), layer.mlp(x)
        )
        attn = sl.self_attn
        q, k, v = lin(x, attn.qkv_proj.weight, attn.qkv_proj.bias).split(
            [NH * D, NKV * D, NKV * D], dim=-1
        )
        torch.testing.assert_close(q, layer.self_attn.q_proj(x))
        torch.testing.assert_close(k, layer.self_attn.k_proj(x))
        torch.testing.assert_close(v, layer.self_attn.v_proj(x))
        torch.testing.assert_close(lin(q, attn.o_proj.weight), layer.self_attn.o_proj(q))
        if family == "qwen3":
            torch.testing.assert_close(attn.q_norm.weight, layer.self_attn.q_norm.weight)
            torch.testing.assert_close(attn.k_norm.weight, layer.self_attn.k_norm.weight)
    assert torch.equal(model.get_embed_and_head()[0], ckpt["model.embed_tokens.weight"])


def test_dense_head_forward_wiring_and_shared_embed_head(sglang_cpu_layers, monkeypatch):
    """forward: the layer stack gets fc(cat(enorm(embed(x)), hnorm(spec hidden))); the
    logits processor gets the stack's output (what the worker feeds back next step)."""
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    monkeypatch.setattr(GemmaRMSNorm, "forward", GemmaRMSNorm.forward_native)
    head, cfg = _bebop_head("qwen3")
    model = _build(cfg)
    model.load_weights(_checkpoint(head).items())
    embed, lm_head = torch.randn(64, H), torch.randn(64, H)
    model.set_embed_and_head(torch.nn.Parameter(embed), torch.nn.Parameter(lm_head))
    assert torch.equal(model.get_embed_and_head()[0], embed)
    assert torch.equal(model.get_embed_and_head()[1], lm_head)

    seen = {}

    def stack(input_ids, positions, forward_batch, input_embeds):
        seen["stack_in"] = input_embeds
        return input_embeds * 2

    monkeypatch.setattr(model.model, "forward", stack)
    monkeypatch.setattr(model.logits_processor, "forward", lambda ids, h, lm, fb: (h, lm))
    ids, h = torch.tensor([3, 7, 11]), torch.randn(3, H)
    batch = types.SimpleNamespace(spec_info=types.SimpleNamespace(hidden_states=h),
                                  forward_mode=types.SimpleNamespace(is_idle=lambda: False))  # fmt: skip
    out, lm = model(ids, torch.arange(3), batch)
    enorm, hnorm, fc, _, _ = head.parts(0)
    with torch.no_grad():
        want = fc(torch.cat([enorm(torch.nn.functional.embedding(ids, embed)), hnorm(h)], -1))
    torch.testing.assert_close(seen["stack_in"], want)
    torch.testing.assert_close(out, 2 * want)
    assert lm is model.lm_head


def test_dense_head_refuses_multi_layer_heads(sglang_cpu_layers):
    """Building the dense head from a 2-layer MTP config raises NotImplementedError
    (1-layer heads only)."""
    _, cfg = _bebop_head("qwen3")
    cfg.mtp_num_hidden_layers = 2
    with pytest.raises(NotImplementedError, match="1-layer heads"):
        _build(cfg)


def test_dense_head_rejects_a_foreign_mtp_tensor(sglang_cpu_layers):
    """Loading an mtp.* tensor the dense head lacks (an MoE expert weight) is a ValueError
    naming it."""
    head, cfg = _bebop_head("qwen3")
    model = _build(cfg)
    with pytest.raises(ValueError, match="mtp.layers.0.mlp.experts"):
        model.load_weights([("mtp.layers.0.mlp.experts.0.w1.weight", torch.zeros(1))])


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_dense_target_ignores_mixed_in_head(family):
    """`bebop mtp export --into-target`: the targets' loaders never see mtp.* tensors (the
    stacked q_proj name would otherwise be looked up as mtp...qkv_proj: KeyError)."""
    import importlib

    arch = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    cls = getattr(importlib.import_module(f"sglang.srt.models.{family}"), arch[family])
    seen = []
    target = types.SimpleNamespace(_legacy_load_weights=lambda w: seen.extend(n for n, _ in w),
                                   named_parameters=lambda: iter(()))  # fmt: skip
    weights = [("mtp.layers.0.self_attn.q_proj.weight", torch.ones(1)),
               ("model.norm.weight", torch.ones(1))]  # fmt: skip
    cls.load_weights(target, weights)  # Qwen3 runs its loop here: warns on model.norm only
    if family != "qwen3":
        assert seen == ["model.norm.weight"]
