"""vLLM / SGLang serving backends and the vLLM plugin, against fake engines (no vLLM here).

Guards the mapping logic that runs in our process: engine arguments, sampling
parameters, output conversion (cumulative token ids, logprobs, per-token weight versions,
finish reasons, spec counters), abort-on-close, pause-mode mapping, selector routing and
version bookkeeping of weight updates, and `weight_spec` read from safetensors headers.
The same conversions against vLLM's real classes run in tests/backends/test_integrations_vllm_cpu.py.
"""

from __future__ import annotations

import asyncio
import json
import types

import pytest
import torch
from safetensors.torch import save_file

from bebop_spec.backends import remote_model
from bebop_spec.backends import sglang as sglang_backend
from bebop_spec.backends import vllm as vllm_backend
from bebop_spec.engine.config import EngineConfig
from bebop_spec.patching import vllm_plugin
from bebop_spec.sampling_params import SamplingParams

HF = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 64,
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
    "max_position_embeddings": 128, "eos_token_id": 1, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}  # fmt: skip


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF))
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(64, 16, dtype=torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight": torch.zeros(32, 16, dtype=torch.bfloat16),
            "model.layers.2.eh_proj.weight": torch.zeros(16, 32),  # DeepSeek-style MTP layer
            "lm_head.weight": torch.zeros(64, 16, dtype=torch.bfloat16),
        },
        str(d / "model.safetensors"),
    )
    return d


def _config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(model=str(model_dir), **kw)


def test_weight_spec_from_safetensors_headers(model_dir, tmp_path):
    """weight_spec_of reads shapes and dtypes from safetensors headers: "target" excludes the
    in-checkpoint MTP layer, "draft" is that layer or a separate head's tensors (its lm_head
    excluded), "all" is both; an unknown selector is a ValueError."""
    spec = remote_model.weight_spec_of(model_dir, None, 2, "target")
    assert spec["model.embed_tokens.weight"] == ((64, 16), torch.bfloat16)
    assert "model.layers.2.eh_proj.weight" not in spec
    assert set(remote_model.weight_spec_of(model_dir, None, 2, "draft")) == {
        "model.layers.2.eh_proj.weight"
    }
    head = tmp_path / "head"
    head.mkdir()
    save_file(
        {"mtp.fc.weight": torch.zeros(16, 32), "lm_head.weight": torch.zeros(64, 16)},
        str(head / "m.safetensors"),
    )
    assert set(remote_model.weight_spec_of(model_dir, head, 2, "draft")) == {"mtp.fc.weight"}
    assert len(remote_model.weight_spec_of(model_dir, head, 2, "all")) == 4
    with pytest.raises(ValueError):
        remote_model.weight_spec_of(model_dir, None, 2, "both")


def test_vllm_engine_args(model_dir, monkeypatch):
    """Draft mode "rs" maps to MTP speculation with probabilistic draft sampling, "to" to greedy,
    none to no speculative_config; logprobs are processed; BEBOP_ENGINE_ARGS JSON is merged in."""
    args = vllm_backend.engine_args(_config(model_dir, num_speculative_tokens=2, draft_mode="rs"))
    assert args["speculative_config"] == {
        "method": "mtp",
        "num_speculative_tokens": 2,
        "draft_sample_method": "probabilistic",
    }
    assert args["logprobs_mode"] == "processed_logprobs"
    assert (
        vllm_backend.engine_args(_config(model_dir, draft_mode="to"))["speculative_config"][
            "draft_sample_method"
        ]
        == "greedy"
    )
    assert "speculative_config" not in vllm_backend.engine_args(_config(model_dir, draft_mode=None))
    monkeypatch.setenv("BEBOP_ENGINE_ARGS", '{"tensor_parallel_size": 2}')
    assert vllm_backend.engine_args(_config(model_dir), {"seed": 7})["tensor_parallel_size"] == 2


def test_vllm_sampling_params_mapping():
    """SamplingParams map to vLLM kwargs: top_k -1 becomes 0; the other fields (penalties,
    min_tokens, logit_bias, skip_special_tokens included) pass through unchanged."""
    kw = vllm_backend.sampling_params_kwargs(
        SamplingParams(
            temperature=0.7,
            top_k=-1,
            top_p=0.9,
            min_p=0.1,
            max_tokens=5,
            stop=["x"],
            logprobs=2,
            seed=3,
        )
    )
    assert kw["top_k"] == 0 and kw["top_p"] == 0.9 and kw["min_p"] == 0.1 and kw["stop"] == ["x"]
    assert kw["logprobs"] == 2 and kw["seed"] == 3 and kw["stop_token_ids"] is None
    assert kw["skip_special_tokens"] is True
    kw = vllm_backend.sampling_params_kwargs(
        SamplingParams(
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            min_tokens=2,
            logit_bias={4: -1.0},
            skip_special_tokens=False,
        )
    )
    assert kw["repetition_penalty"] == 1.2 and kw["presence_penalty"] == 0.5
    assert kw["skip_special_tokens"] is False
    assert kw["frequency_penalty"] == 0.3
    assert kw["min_tokens"] == 2 and kw["logit_bias"] == {4: -1.0}


def _lp(d):
    return {t: types.SimpleNamespace(logprob=v) for t, v in d.items()}


def _vout(rid, ids, finish=None, lps=None, spans=None, metrics=None):
    c = types.SimpleNamespace(index=0, token_ids=ids, text="t" * len(ids), logprobs=lps, finish_reason=finish,
                              stop_reason=None, weight_versions=spans, spec_decode_metrics=metrics)  # fmt: skip
    return types.SimpleNamespace(request_id=rid, prompt_token_ids=[5, 6], outputs=[c], prompt=None)


class FakeAsyncLLM:
    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    async def generate(self, prompt, params, request_id):
        self.calls.append(("generate", prompt, params, request_id))
        for out in self.outputs:
            yield out

    async def abort(self, rid):
        self.calls.append(("abort", rid))

    async def pause_generation(self, mode, clear_cache=True):
        self.calls.append(("pause", mode))

    async def resume_generation(self):
        self.calls.append(("resume",))

    async def reset_prefix_cache(self):
        self.calls.append(("reset",))


def _run(coro):
    return asyncio.run(coro)


def _vllm_backend(model_dir, outputs, **kw):
    b = vllm_backend.VLLMBackend(_config(model_dir, **kw), engine=FakeAsyncLLM(outputs))
    b._vllm_params = lambda p: p  # vllm.SamplingParams is checked in the vLLM CPU suite
    return b


def test_vllm_generate_converts_cumulative_outputs(model_dir):
    """Cumulative vLLM outputs convert to ours: token ids, finish reason, logprobs, per-token weight
    versions, spec counters from the acceptance histogram (3 drafts, 4 accepted, [2, 2]);
    totals and observers update, and a completed request is not aborted."""
    metrics = types.SimpleNamespace(
        histogram=[1, 0, 2], num_draft_tokens=6
    )  # γ=2: j=0 once, j=2 twice
    spans = [types.SimpleNamespace(version="0", start=0, end=3)]
    outs = [
        _vout("r", [7], lps=[_lp({7: -0.5, 8: -1.0})]),
        _vout(
            "r",
            [7, 8, 9],
            finish="length",
            lps=[_lp({7: -0.5}), _lp({8: -0.1}), _lp({9: -0.2})],
            spans=spans,
            metrics=metrics,
        ),
    ]
    b = _vllm_backend(model_dir, outs, num_speculative_tokens=2)
    seen = []
    b.add_observer(seen.append)

    async def go():
        return [o async for o in b.generate([5, 6], SamplingParams(logprobs=1), "r")]

    got = _run(go())
    assert [o.outputs[0].token_ids for o in got] == [[7], [7, 8, 9]]
    last = got[-1].outputs[0]
    assert last.finish_reason == "length" and last.logprobs == [-0.5, -0.1, -0.2]
    assert last.top_logprobs[0] == {7: -0.5} and last.weight_versions == [0, 0, 0]
    assert (last.spec.num_drafts, last.spec.num_accepted_tokens, last.spec.accepted_per_pos) == (
        3,
        4,
        [2, 2],
    )
    assert b.spec_totals.num_accepted_tokens == 4 and sum(s.num_generated_tokens for s in seen) == 3
    assert b.num_running == 0 and ("abort", "r") not in b._engine.calls


def test_vllm_closing_early_aborts(model_dir):
    """Closing the generate stream after its first output aborts the request in the engine."""
    b = _vllm_backend(model_dir, [_vout("r", [7]), _vout("r", [7, 8])])

    async def go():
        agen = b.generate([5], SamplingParams(), "r")
        await agen.__anext__()
        await agen.aclose()

    _run(go())
    assert ("abort", "r") in b._engine.calls


def test_vllm_pause_modes_and_weight_updates(model_dir, monkeypatch):
    """Pause retract maps to vLLM's keep, an unknown mode is a ValueError; an "all" update is sent
    as a target and a draft part under its label and bumps the version to 1; a draft update
    holding a non-draft tensor is a ValueError."""
    b = _vllm_backend(model_dir, [], num_speculative_tokens=2)
    sent = []

    async def fake_send(tensors, draft, label):
        sent.append((sorted(tensors), draft, label))

    monkeypatch.setattr(b, "_send", fake_send)

    async def go():
        await b.pause("retract")
        await b.resume()
        await b.update_weights(
            {"lm_head.weight": torch.zeros(1), "model.layers.2.eh_proj.weight": torch.zeros(1)},
            "all",
            "step-1",
        )
        with pytest.raises(ValueError, match="outside"):
            await b.update_weights({"lm_head.weight": torch.zeros(1)}, "draft")
        with pytest.raises(ValueError):
            await b.pause("sideways")

    _run(go())
    assert ("pause", "keep") in b._engine.calls
    assert sent == [
        (["lm_head.weight"], False, "step-1"),
        (["model.layers.2.eh_proj.weight"], True, "step-1"),
    ]
    assert b.version == 1 and b.weight_version == "step-1" and b._version_of("step-1") == 1


def test_sglang_engine_args_and_params(model_dir):
    """rs with γ = 3 maps to SGLang rejection sampling, eagle top-k 1 and 4 draft tokens; top_k 0
    becomes -1, and seed / max_tokens / include_stop_str_in_output map to SGLang's names."""
    args = sglang_backend.engine_args(_config(model_dir, num_speculative_tokens=3, draft_mode="rs"))
    assert args["speculative_use_rejection_sampling"] and args["speculative_eagle_topk"] == 1
    assert args["speculative_num_draft_tokens"] == 4
    p = sglang_backend.sampling_params_dict(
        SamplingParams(top_k=0, seed=9, max_tokens=4, include_stop_str_in_output=True)
    )
    assert (
        p["top_k"] == -1
        and p["sampling_seed"] == 9
        and p["max_new_tokens"] == 4
        and p["no_stop_trim"]
    )


def test_sglang_sampling_params_pass_penalties():
    """Penalties, min_tokens, logit_bias and skip_special_tokens reach SGLang under its
    names, never dropped."""
    p = sglang_backend.sampling_params_dict(
        SamplingParams(
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            min_tokens=2,
            logit_bias={4: -1.0},
            skip_special_tokens=False,
        )
    )
    assert p["repetition_penalty"] == 1.2 and p["frequency_penalty"] == 0.3
    assert p["skip_special_tokens"] is False
    assert p["min_new_tokens"] == 2 and p["logit_bias"] == {"4": -1.0}


class FakeTM:
    def __init__(self):
        self.calls = []

    def abort_request(self, rid="", abort_all=False):
        self.calls.append(("abort", rid, abort_all))


class FakeSGLangEngine:
    def __init__(self, chunks):
        self.chunks, self.tokenizer_manager = chunks, FakeTM()

    async def async_generate(self, **kw):
        self.kw = kw

        async def gen():
            for c in self.chunks:
                yield c

        return gen()


def test_sglang_generate_cumulative_and_incremental(model_dir):
    """Cumulative and incremental SGLang chunks give the same output: ids, text, finish and stop
    reason, logprobs, weight versions, spec counters from spec_verify_ct; the request id and
    return_logprob reach the engine."""
    meta_end = {"finish_reason": {"type": "stop", "matched": 1}, "completion_tokens": 3, "spec_verify_ct": 2,
                "weight_version": "0", "output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None], [-0.3, 1, None]]}  # fmt: skip
    for chunks in (
        [
            {"output_ids": [7], "text": "a", "meta_info": {}},
            {"output_ids": [7, 8, 1], "text": "abc", "meta_info": meta_end},
        ],
        [
            {"output_ids": [7], "text": "a", "meta_info": {}},
            {"output_ids": [8, 1], "text": "bc", "meta_info": meta_end},
        ],
    ):
        b = sglang_backend.SGLangBackend(
            _config(model_dir, num_speculative_tokens=2), engine=FakeSGLangEngine(chunks)
        )

        async def go(b=b):
            return [o async for o in b.generate([5], SamplingParams(logprobs=0), "q")]

        out = _run(go())[-1].outputs[0]
        assert out.token_ids == [7, 8, 1] and out.text == "abc" and out.finish_reason == "stop"
        assert (
            out.stop_reason == 1
            and out.logprobs == [-0.1, -0.2, -0.3]
            and out.weight_versions == [0, 0, 0]
        )
        assert (out.spec.num_drafts, out.spec.num_accepted_tokens, out.spec.num_draft_tokens) == (
            2,
            1,
            4,
        )
        assert b._engine.kw["rid"] == "q" and b._engine.kw["return_logprob"]


def test_sglang_update_weights_rejection_keeps_version(model_dir, monkeypatch):
    """A draft weight update without speculation is a ValueError and the version stays 0."""
    b = sglang_backend.SGLangBackend(
        _config(model_dir, draft_mode=None), engine=FakeSGLangEngine([])
    )
    with pytest.raises(ValueError, match="speculative"):
        _run(b.update_weights({}, "draft"))
    assert b.version == 0


def test_plugin_reports_unpatched_vllm(monkeypatch, caplog):
    """On unpatched vLLM the plugin logs the `bebop patch vllm` hint, or raises with
    BEBOP_REQUIRE_PATCHED=1; a spec config without probabilistic drafts warns, one with does not."""
    monkeypatch.setattr(vllm_plugin, "_done", False)
    monkeypatch.setattr(vllm_plugin, "patch_status", lambda: (False, None))
    vllm_plugin.register()
    assert "bebop patch vllm" in caplog.text
    monkeypatch.setattr(vllm_plugin, "_done", False)
    monkeypatch.setenv("BEBOP_REQUIRE_PATCHED", "1")
    with pytest.raises(RuntimeError):
        vllm_plugin.register()
    assert vllm_plugin.check_speculative_config({"method": "mtp"})
    assert not vllm_plugin.check_speculative_config({"draft_sample_method": "probabilistic"})
