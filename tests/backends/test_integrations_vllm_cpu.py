"""Unit tests of the patched vLLM 0.33.0 code, on CPU, against vLLM's own functions.

These run inside an interpreter that can import the *patched* vLLM tree (see
`python -m tools.engine_sources vllm`); `tests/backends/test_integrations_vllm_cpu.py`
launches them that way. In any other interpreter they skip.

Invariants guarded:
- V1 runner: the draft q produced by the patched drafting path equals, bit for bit, the
  target p that RejectionSampler.apply_sampling_constraints + softmax produces from the
  same logits (same temperature, top-k, top-p), including parallel drafting's row expansion.
- Model Runner V2: the masked draft logits the speculator caches give, after the
  rejection kernels' division by T, exactly the target's processed distribution
  (temperature, min-p, top-k/top-p through vLLM's own apply_top_k_top_p).
- Sampled draft tokens never fall outside the processed support (2,000 draws per row).
- Entropy/acceptance bookkeeping of both rejection samplers, and its Prometheus export.
- Dense-target heads (patch 0003): an exported Bebop head's config maps to BebopDenseMTP,
  the model builds on CPU, every checkpoint tensor of a `bebop_spec` head loads into it
  (q/k/v and gate/up stacked) and its norms / fc / MLP compute what Bebop's head computes;
  a target checkpoint with the head mixed in still loads into Qwen3ForCausalLM.
"""

from __future__ import annotations

import math
import os
import types

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # CPU platform for layer construction

torch = pytest.importorskip("torch")
bebop = pytest.importorskip(
    "vllm.v1.spec_decode.bebop", reason="needs the patched vLLM tree on sys.path"
)
pytestmark = pytest.mark.vllm

from vllm.v1.sample import rejection_sampler as v1rs  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessors  # noqa: E402
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p  # noqa: E402
from vllm.v1.spec_decode import llm_base_proposer  # noqa: E402

V = 64


def _metadata(temperature, top_k=None, top_p=None) -> SamplingMetadata:
    n = temperature.shape[0]
    return SamplingMetadata(
        temperature=temperature,
        all_greedy=False,
        all_random=bool((temperature > 0).all()),
        top_p=top_p,
        top_k=top_k,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(n),
        presence_penalties=torch.zeros(n),
        repetition_penalties=torch.ones(n),
        output_token_ids=[[] for _ in range(n)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def _expand_cpu(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    """Torch stand-in for the Triton `_expand` kernel used by expand_batch_to_tokens."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    out = torch.repeat_interleave(x, counts, output_size=num_tokens)
    return torch.where(out == replace_from, torch.full_like(out, replace_to), out)


@pytest.fixture
def target_p(monkeypatch):
    """The V1 target's processed p: RejectionSampler's own apply_sampling_constraints."""
    monkeypatch.setattr(v1rs, "expand_batch_to_tokens", _expand_cpu)

    def p(logits, md):
        cu = torch.arange(1, logits.shape[0] + 1)
        return v1rs.apply_sampling_constraints(logits.clone().float(), cu, md).softmax(
            dim=-1, dtype=torch.float32
        )

    return p


CASES = [
    ([1.0, 0.7, 1.3, 0.5], [5, 64, 20, 1], [1.0, 0.9, 0.5, 0.8]),
    ([0.8, 1.0, 1.0, 2.0], None, [0.3, 0.95, 1.0, 0.6]),
    ([1.0, 0.6, 1.0, 1.0], [2, 3, 64, 7], None),
]


@pytest.mark.parametrize("temps,top_k,top_p", CASES)
def test_v1_draft_q_equals_target_processing(temps, top_k, top_p, target_p):
    """Same logits through the drafting path and the target path give the same tensor."""
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    md = _metadata(
        torch.tensor(temps),
        None if top_k is None else torch.tensor(top_k),
        None if top_p is None else torch.tensor(top_p),
    )
    _, q = llm_base_proposer.compute_probs_and_sample_next_token(logits.clone(), md)
    assert torch.equal(q, target_p(logits, md))
    unpatched = torch.softmax(logits / md.temperature[:, None], -1)  # what vLLM used to use
    assert not torch.allclose(q, unpatched), "the test must exercise a real difference"


def test_v1_draft_samples_stay_in_processed_support():
    """2,000 draws per row from the V1 drafting path all have q > 0: none leaves the processed
    top-k / top-p support."""
    torch.manual_seed(1)
    logits = torch.randn(3, V) * 2
    md = _metadata(
        torch.tensor([1.0, 1.0, 0.7]), torch.tensor([3, 64, 10]), torch.tensor([1.0, 0.5, 0.9])
    )
    for _ in range(2000 // 50):
        ids, q = llm_base_proposer.compute_probs_and_sample_next_token(
            logits.repeat(50, 1),
            _metadata(md.temperature.repeat(50), md.top_k.repeat(50), md.top_p.repeat(50)),
        )
        assert (q.gather(1, ids[:, None]) > 0).all()


def test_v1_parallel_drafting_expands_top_k_top_p(target_p):
    """DFlash-style drafting: K rows per request; top_k/top_p are repeated like temperature."""
    torch.manual_seed(2)
    k = 3
    md = _metadata(torch.tensor([0.9, 1.2]), torch.tensor([4, 9]), torch.tensor([0.8, 0.6]))
    logits = torch.randn(2 * k, V)
    proposer = types.SimpleNamespace(_enable_probabilistic_draft_probs=True, use_fp64_gumbel=False)
    _, q = llm_base_proposer.SpecDecodeBaseProposer._sample_from_logits(
        proposer, logits.clone(), md
    )
    expanded = _metadata(
        md.temperature.repeat_interleave(k),
        md.top_k.repeat_interleave(k),
        md.top_p.repeat_interleave(k),
    )
    assert torch.equal(q, target_p(logits, expanded))


def _mrv2_target_p(logits, temp, top_k, top_p, min_p):
    """MRV2 Sampler.apply_sampling_params order: T, min-p, top-k/top-p (vLLM's function)."""
    x = logits.float() / torch.where(temp == 0, 1.0, temp)[:, None]
    thr = x.amax(-1, keepdim=True) + torch.log(min_p)[:, None]
    x = x.masked_fill(x < thr, float("-inf"))
    return apply_top_k_top_p(x, top_k, top_p).softmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrv2_cached_q_equals_target_processing(dtype):
    """softmax(masked cached logits / T), as the rejection kernels compute q, == processed p."""
    torch.manual_seed(3)
    n_slots = 6
    temp = torch.tensor([1.0, 0.7, 1.3, 0.0, 0.9, 1.0])
    top_k = torch.tensor([5, V, 20, 1, V, 8], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.6, 1.0, 1.0, 0.7])
    min_p = torch.tensor([0.0, 0.05, 0.0, 0.0, 0.2, 0.1])
    idx = torch.tensor([2, 0, 5, 1, 4, -1])  # rows -> request slots; -1 is CUDA-graph padding
    logits = (torch.randn(n_slots, V) * 3).to(dtype)
    masked = bebop.mask_draft_logits(logits, idx, temp, top_k, top_p, min_p)
    assert masked.dtype == dtype
    real = idx >= 0
    i = idx[real]
    t = torch.where(temp[i] == 0, 1.0, temp[i])
    q = (masked[real].float() / t[:, None]).softmax(-1)
    p = _mrv2_target_p(logits[real], temp[i], top_k[i], top_p[i], min_p[i])
    torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert torch.equal(q > 0, p > 0), "same support"
    kept = ~masked.isinf()
    assert torch.equal(masked[kept], logits[kept]), "kept values stay pre-temperature"


def test_mrv2_sample_draft_masks_what_it_samples_and_caches(monkeypatch):
    """DraftModelSpeculator.sample_draft hands the masked logits to the sampler and cache."""
    from vllm.v1.worker.gpu.spec_decode import speculator as spec_mod

    seen = {}

    def fake_gumbel(logits, idx_mapping, temperature, seeds, pos, **kw):
        seen["logits"] = logits.clone()
        kw["logits_cache"][idx_mapping, 0] = logits  # what the Triton kernel stores
        return logits.argmax(-1)

    monkeypatch.setattr(spec_mod, "gumbel_sample", fake_gumbel)
    torch.manual_seed(4)
    raw = torch.randn(2, V)
    states = types.SimpleNamespace(
        vocab_size=V,
        top_k=types.SimpleNamespace(np=torch.tensor([3, V]).numpy(), gpu=torch.tensor([3, V])),
        top_p=types.SimpleNamespace(
            np=torch.tensor([1.0, 0.5]).numpy(), gpu=torch.tensor([1.0, 0.5])
        ),
        min_p=types.SimpleNamespace(
            np=torch.tensor([0.0, 0.0]).numpy(), gpu=torch.tensor([0.0, 0.0])
        ),
    )
    cache = torch.zeros(2, 1, V)
    stub = types.SimpleNamespace(
        use_local_argmax_reduction=False,
        draft_watermarker=None,
        use_fp64_gumbel=False,
        bebop_sampling_states=states,
        compute_draft_logits=lambda h, step: raw.clone(),
        _maybe_predict_acceptance=lambda *a: None,
    )
    stub.bebop_mask_draft_logits = types.MethodType(
        spec_mod.DraftModelSpeculator.bebop_mask_draft_logits, stub
    )
    temp = torch.tensor([1.0, 1.0])
    spec_mod.DraftModelSpeculator.sample_draft(
        stub,
        None,
        torch.zeros(2, dtype=torch.long),
        torch.tensor([0, 1]),
        temp,
        torch.zeros(2, dtype=torch.long),
        torch.tensor(0),
        cache,
    )
    assert (~seen["logits"][0].isinf()).sum() == 3
    assert torch.equal(cache[:, 0], seen["logits"])
    # no request uses the transforms: eager path leaves logits untouched
    states.top_k.np[:] = V
    states.top_p.np[:] = 1.0
    assert not bebop.needs_masking(states)


def test_entropy_stats_v1_observe_and_collect():
    """Two requests: 3 drafts, 2 accepted; 2 drafts, 0 accepted (one greedy, H := 0)."""
    stats = bebop.VerifiedEntropyStats()
    rs = types.SimpleNamespace(bebop_stats=stats)
    logits = torch.zeros(5, V)  # uniform: H = log V
    logits[3:] = torch.randn(2, V)
    out = torch.tensor([[7, 8, 9, -1], [5, -1, -1, -1]])
    md = _metadata(torch.tensor([1.0, 0.0]))
    md.all_random = False
    meta = types.SimpleNamespace(num_draft_tokens=[3, 2])
    v1rs.RejectionSampler._bebop_observe(rs, logits, out, meta, md)
    verified, accepted, hsum = stats.collect()
    assert sum(verified) == 5 and sum(accepted) == 2
    b_uniform = int(
        torch.bucketize(torch.tensor(math.log(V)), torch.tensor(bebop.ENTROPY_BUCKET_EDGES))
    )
    assert verified[b_uniform] == 3 and accepted[b_uniform] == 2
    assert verified[0] == 2 and accepted[0] == 0  # greedy rows: H = 0
    assert hsum[b_uniform] == pytest.approx(3 * math.log(V), rel=1e-6)
    assert stats.collect() is None, "collect reports deltas"


def test_entropy_stats_mrv2_rows():
    """Request A: 3 drafts, 1 accepted (num_sampled 2); B: prefill (1 row); C: placeholder draft."""
    cu = torch.tensor([0, 4, 5, 7])
    num_sampled = torch.tensor([2, 1, 1])
    draft = torch.tensor([11, 12, 13, 14, 20, 30, -1])
    verified, accepted, req = bebop.mrv2_verified_rows(cu, num_sampled, draft)
    assert verified.tolist() == [True, True, True, False, False, False, False]
    assert accepted.tolist() == [True, False, False, False, False, False, False]
    assert req.tolist() == [0, 0, 0, 0, 1, 2, 2]


def test_spec_decoding_stats_reach_prometheus():
    """Two observed entropy steps (bucket 2: 4 verified, 3 accepted, entropy sum 0.8) add up in
    Prometheus: 8 verified, 6 accepted, entropy count 8 and sum 1.6."""
    import prometheus_client
    from vllm.v1.spec_decode.metrics import SpecDecodingProm, SpecDecodingStats

    s = SpecDecodingStats.new(3)
    step = [[0.0] * bebop.NUM_ENTROPY_BUCKETS for _ in range(3)]
    step[0][2], step[1][2], step[2][2] = 4.0, 3.0, 0.8
    s.observe_entropy(step)
    s.observe_entropy(step)
    prom = SpecDecodingProm(
        types.SimpleNamespace(num_speculative_tokens=3), ["model_name", "engine"], {0: ["m", "0"]}
    )
    prom.observe(s, 0)
    text = prometheus_client.generate_latest().decode()
    le = bebop.ENTROPY_BUCKET_EDGES[2]
    assert (
        f'vllm:bebop_spec_decode_num_verified_tokens_by_entropy_total{{engine="0",entropy_le="{le}",model_name="m"}} 8.0'
        in text
    )
    assert (
        f'vllm:bebop_spec_decode_num_accepted_tokens_by_entropy_total{{engine="0",entropy_le="{le}",model_name="m"}} 6.0'
        in text
    )
    assert 'vllm:bebop_spec_decode_target_entropy_count{engine="0",model_name="m"} 8.0' in text
    assert 'vllm:bebop_spec_decode_target_entropy_sum{engine="0",model_name="m"} 1.6' in text


def test_model_runner_output_carries_entropy_stats():
    """The patched ModelRunnerOutput accepts and keeps a bebop_entropy_stats field."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = ModelRunnerOutput(req_ids=[], req_id_to_index={}, bebop_entropy_stats=[[1.0]])
    assert out.bebop_entropy_stats == [[1.0]]


def test_backend_builds_real_vllm_sampling_params():
    """Our SamplingParams -> vllm.SamplingParams accepts every field we map."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    from bebop_spec.backends import vllm as vllm_backend
    from bebop_spec.sampling_params import SamplingParams

    ours = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, max_tokens=4,
                          stop=["x"], stop_token_ids=[3], logprobs=2, seed=1)  # fmt: skip
    sp = VSamplingParams(
        **vllm_backend.sampling_params_kwargs(ours), output_kind=RequestOutputKind.CUMULATIVE
    )
    assert (sp.top_k, sp.top_p, sp.min_p, sp.max_tokens, sp.logprobs, sp.seed) == (
        20,
        0.9,
        0.05,
        4,
        2,
        1,
    )
    assert sp.stop == ["x"] and sp.stop_token_ids == [3]
    greedy = VSamplingParams(
        **vllm_backend.sampling_params_kwargs(SamplingParams(temperature=0.0, top_k=-1))
    )
    assert greedy.top_k in (0, -1)


def test_backend_converts_real_vllm_outputs():
    """vllm.outputs.RequestOutput (FlatLogprobs, weight spans, spec metrics) -> ours."""
    from vllm.logprobs import Logprob, create_sample_logprobs
    from vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    from bebop_spec.backends import vllm as vllm_backend
    from bebop_spec.sampling_params import SamplingParams

    lps = create_sample_logprobs(True)
    for tid, lp in ((7, -0.5), (8, -0.25)):
        lps.append({tid: Logprob(logprob=lp, rank=1), 99: Logprob(logprob=-3.0, rank=2)})
    metrics = RequestSpecDecodeMetrics(num_spec_tokens=2, histogram=[0, 1, 0], num_draft_tokens=2)
    c = CompletionOutput(index=0, text="ab", token_ids=[7, 8], cumulative_logprob=None, logprobs=lps,
                         finish_reason="stop", stop_reason=8, spec_decode_metrics=metrics,
                         weight_versions=[WeightVersionSpan("v0", 0, 1), WeightVersionSpan("v1", 1, 2)])  # fmt: skip
    out = RequestOutput("r", None, [1, 2], None, [c], finished=True)
    labels = {"v0": 0, "v1": 1}
    got = vllm_backend.convert_output(out, SamplingParams(logprobs=1), {}, 1, labels.get)
    o = got.outputs[0]
    assert got.finished and o.token_ids == [7, 8] and o.logprobs == [-0.5, -0.25]
    assert o.top_logprobs == [{7: -0.5}, {8: -0.25}] and o.weight_versions == [0, 1]
    assert (o.spec.num_drafts, o.spec.num_accepted_tokens, o.spec.accepted_per_pos) == (
        1,
        1,
        [1, 0],
    )


PATCHED_MODULES = [
    "vllm.v1.spec_decode.bebop",
    "vllm.v1.spec_decode.llm_base_proposer",
    "vllm.v1.worker.gpu.spec_decode.speculator",
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.sample.rejection_sampler",
    "vllm.v1.worker.gpu.spec_decode.rejection_sampler",
    "vllm.v1.outputs",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.spec_decode.metrics",
    "vllm.model_executor.models.bebop_mtp",
    "vllm.config.speculative",
    "vllm.model_executor.models.registry",
    "vllm.transformers_utils.model_arch_config_convertor",
    "vllm.model_executor.models.qwen2",
    "vllm.model_executor.models.llama",
]


@pytest.mark.parametrize("name", PATCHED_MODULES)
def test_patched_module_imports_on_cpu(name):
    """Each patched vLLM module (one per parameter) imports on CPU."""
    import importlib

    importlib.import_module(name)


def _dense_head_fixture():
    from transformers import Qwen3Config

    from bebop_spec.models.config import ModelConfig
    from bebop_spec.models.mtp import MTPHead

    hf = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, rms_norm_eps=1e-6, architectures=["Qwen3ForCausalLM"])  # fmt: skip
    cfg = ModelConfig.from_hf({**hf, "model_type": "qwen3"})
    torch.manual_seed(5)
    head = MTPHead(cfg, "qwen3_next", 1)
    for prm in head.parameters():
        prm.data.normal_(0, 0.2)
    vcfg = Qwen3Config(**hf)
    vcfg.mtp_num_hidden_layers = 1
    return head, vcfg


def _build_dense_mtp(hf_config):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.models.bebop_mtp import BebopDenseMTP

    class _ModelConfig(types.SimpleNamespace):
        def __getattr__(self, name):  # the few fields layers read; the rest are "unset"
            return None

    vc = VllmConfig()
    with set_current_vllm_config(vc):
        if not model_parallel_is_initialized():
            init_distributed_environment(1, 0, "tcp://127.0.0.1:29533", 0, backend="gloo")
            ensure_model_parallel_initialized(1, 1)
    mc = _ModelConfig(hf_config=hf_config, dtype=torch.float32, is_mm_prefix_lm=False)
    mc.get_sliding_window = lambda: None
    object.__setattr__(vc, "model_config", mc)
    with set_current_vllm_config(vc):
        return BebopDenseMTP(vllm_config=vc, prefix=""), vc


def test_dense_head_config_maps_to_bebop_mtp():
    """hf_config_override turns a head config with mtp_num_hidden_layers into bebop_dense_mtp /
    BebopDenseMTP (n_predict 1, target type qwen3), an MTP model type the registry knows."""
    from typing import get_args

    from vllm.config.speculative import MTPModelTypes, SpeculativeConfig

    _, vcfg = _dense_head_fixture()
    out = SpeculativeConfig.hf_config_override(vcfg)
    assert (out.model_type, out.architectures, out.n_predict) == (
        "bebop_dense_mtp",
        ["BebopDenseMTP"],
        1,
    )
    assert out.bebop_target_model_type == "qwen3" and "bebop_dense_mtp" in get_args(MTPModelTypes)
    from vllm.model_executor.models.registry import _SPECULATIVE_DECODING_MODELS

    assert _SPECULATIVE_DECODING_MODELS["BebopDenseMTP"] == ("bebop_mtp", "BebopDenseMTP")


def test_dense_head_loads_every_tensor_and_matches_bebop():
    """Every BebopDenseMTP parameter loads from a Bebop head checkpoint (target tensors ignored);
    its norms, fc, stacked gate/up and q/k/v and q_norm match Bebop's head."""
    from vllm.config import set_current_vllm_config
    from vllm.config.speculative import SpeculativeConfig

    head, vcfg = _dense_head_fixture()
    model, vc = _build_dense_mtp(SpeculativeConfig.hf_config_override(vcfg))
    ckpt = dict(head.state_dict())
    ckpt = {k: v for k, v in ckpt.items() if k.startswith("mtp.")}
    ckpt["model.embed_tokens.weight"] = torch.randn(64, 32)
    ckpt["lm_head.weight"] = torch.randn(64, 32)
    ckpt["model.layers.0.mlp.up_proj.weight"] = torch.randn(48, 32)  # a target tensor: ignored
    with set_current_vllm_config(vc):
        loaded = model.load_weights(ckpt.items())
    assert loaded == {n for n, _ in model.named_parameters()}, "every parameter comes from the head"
    enorm, hnorm, fc, layer, norm = head.parts(0)
    x = torch.randn(5, 32)
    with torch.no_grad(), set_current_vllm_config(vc):
        m = model.model
        torch.testing.assert_close(m.pre_fc_norm_embedding.forward_native(x), enorm(x))
        torch.testing.assert_close(m.pre_fc_norm_hidden.forward_native(x), hnorm(x))
        torch.testing.assert_close(m.norm.forward_native(x), norm(x))  # zero-centred (1 + w)
        lin = (
            torch.nn.functional.linear
        )  # the loaded weights (vLLM's CPU GEMM needs post-load setup)
        xx = torch.cat([x, x], -1)
        torch.testing.assert_close(lin(xx, m.fc.weight), fc(xx))
        mlp = m.layers[0].mlp
        g, u = lin(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)
        got_mlp = lin(torch.nn.functional.silu(g) * u, mlp.down_proj.weight)
        torch.testing.assert_close(got_mlp, layer.mlp(x))
        attn = m.layers[0].self_attn
        q, k, v = lin(x, attn.qkv_proj.weight).split([32, 16, 16], dim=-1)
        torch.testing.assert_close(q, layer.self_attn.q_proj(x))
        torch.testing.assert_close(k, layer.self_attn.k_proj(x))
        torch.testing.assert_close(v, layer.self_attn.v_proj(x))
        torch.testing.assert_close(attn.q_norm.weight, layer.self_attn.q_norm.weight)


def test_dense_target_ignores_mixed_in_head():
    """`bebop mtp export --into-target`: Qwen3ForCausalLM.load_weights skips mtp.* tensors."""
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    target = torch.nn.Module()
    target.lm_head = torch.nn.Linear(4, 4, bias=False)
    weights = [("lm_head.weight", torch.ones(4, 4)), ("mtp.fc.weight", torch.ones(4, 8))]
    assert Qwen3ForCausalLM.load_weights(target, weights) == {"lm_head.weight"}
