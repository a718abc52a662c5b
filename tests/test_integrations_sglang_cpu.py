"""Unit tests of the patched SGLang 0.5.23 code, on CPU.

Run inside an interpreter that imports the *patched* SGLang tree (see
`python -m bebop_spec.integrations.engine_sources sglang`); tests/test_integrations_engines.py
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
    info = types.SimpleNamespace(top_ps=torch.ones(2), need_top_p_sampling=False)
    assert bebop.draft_top_ps(info) is None
    info.need_top_p_sampling = True
    assert bebop.draft_top_ps(info) is info.top_ps


def test_chain_verification_stats_and_prometheus():
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
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]])
    k = bebop.torch_top_k_renorm(probs, torch.tensor([2]))
    assert torch.allclose(
        k, torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.0]])
    )  # ties at the k-th value kept
    p = bebop.torch_top_p_renorm(probs, torch.tensor([0.5]))
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0, 0.0]]))
    assert torch.equal(bebop.torch_top_p_renorm(probs, torch.tensor([1.0])), probs / probs.sum())


def test_backend_request_types_are_sglangs():
    from sglang.srt.managers.io_struct import (
        PauseGenerationReqInput,
        UpdateWeightsFromTensorReqInput,
    )
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    from bebop_spec.integrations import sglang_backend
    from bebop_spec.sampling_params import SamplingParams

    d = sglang_backend.sampling_params_dict(
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, stop=["x"], seed=3)
    )
    sp = SGLSamplingParams(**d)
    sp.verify(1000)
    assert (sp.top_k, sp.top_p, sp.min_p) == (20, 0.9, 0.05)
    for mode in sglang_backend.PAUSE_MODES:
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
]


@pytest.mark.parametrize("name", PATCHED_MODULES)
def test_patched_module_imports_on_cpu(name):
    import importlib

    importlib.import_module(name)
