"""Server pieces that need no running server: protocol models, version spans, weight-update
checks, safetensors decoding, metrics rendering, config. (The flattened-bucket layout has
its home in bebop_client.bucket: tests/clients/test_client_bucket.py.)"""

from __future__ import annotations

import json
import math
import struct
from types import SimpleNamespace

import pydantic
import pytest
import safetensors.torch
import torch

from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.outputs import SpecStats, StepStats
from bebop_spec.engine.weights import check_update
from bebop_spec.errors import WeightUpdateError
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.metrics import ServerMetrics, entropy_bucket
from bebop_spec.server.protocol.openai import ChatCompletionRequest, CompletionRequest
from bebop_spec.server.protocol.sglang import GenerateRequest, SGLangSamplingParams
from bebop_spec.server.serving.common import version_spans
from bebop_spec.server.weight_sync.tensors import load_safetensors_bytes, parse_dtype

SPEC = {"w": ((2, 3), torch.float32), "b": ((3,), torch.float32)}


def test_version_spans_merge_runs_by_label():
    """Per-token version counters become SGLang spans; counters sharing a label merge."""
    labels = {0: "default", 1: "v1", 2: "v1", 3: "v2"}
    assert version_spans([0, 0, 1, 2, 2, 3], labels) == [
        {"version": "default", "start": 0, "end": 2},
        {"version": "v1", "start": 2, "end": 5},
        {"version": "v2", "start": 5, "end": 6},
    ]
    assert version_spans([], labels) == []


def test_check_update_accepts_and_casts():
    """A float update of the right shapes passes; bf16 is cast to the serving dtype."""
    ready = check_update({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, SPEC)
    assert ready["w"].dtype == torch.float32


@pytest.mark.parametrize(
    ("tensors", "why"),
    [
        ({}, "no tensors"),
        ({"w": torch.ones(3, 2)}, "shape"),
        ({"w": torch.ones(2, 3, dtype=torch.int64)}, "dtype"),
        ({"w": torch.full((2, 3), math.inf)}, "non-finite"),
        ({"w": torch.ones(2, 3), "x": torch.ones(1)}, "unknown"),
        ({"w": torch.ones(2, 3), "b": torch.tensor([0.0, math.nan, 0.0])}, "non-finite"),
    ],
)
def test_check_update_rejects_whole_update(tensors, why):
    """Any problem in any tensor rejects the whole update, naming the problem."""
    with pytest.raises(WeightUpdateError, match=why):
        check_update(tensors, SPEC)


def _st(header: object, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _f32(shape: list, offsets: list) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


def test_safetensors_bytes_roundtrip():
    """Our zero-copy decoder reads what safetensors writes, every dtype, views included."""
    t = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5),
         "d": torch.zeros(0), "e": torch.tensor([True, False]), "f": torch.randn(2, 2).half()}  # fmt: skip
    data = safetensors.torch.save(t, metadata={"step": "3"})
    for form in (data, bytearray(data)):
        out = load_safetensors_bytes(form)
        assert out.keys() == t.keys() and all(torch.equal(out[k], v) for k, v in t.items())


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"1234567",
        b"\xff" * 16,  # header length beyond the buffer
        b"\x80\x04\x95pickle-bytes-here",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
        _st([1, 2]),
        _st({"a": "x"}),
        _st({"a": _f32([2], [0, 4])}, b"\0" * 8),  # size != shape
        _st({"a": _f32([2], [0, 8])}, b"\0" * 4),  # beyond the data
        _st({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        _st({"a": _f32([-2], [0, 8])}, b"\0" * 8),
        _st({"a": _f32([2.0], [0, 8])}, b"\0" * 8),
        _st({"a": _f32([2], [0, 8]), "b": _f32([1], [4, 8])}, b"\0" * 8),  # overlap
    ],
)
def test_safetensors_bytes_rejects_malformed(junk):
    """Anything but well-formed safetensors (pickle included) is a WeightUpdateError."""
    with pytest.raises(WeightUpdateError):
        load_safetensors_bytes(junk)


def test_parse_dtype_spellings():
    """parse_dtype accepts bare and "torch."-prefixed dtype names; an unknown name is a
    WeightUpdateError."""
    assert (
        parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    )
    with pytest.raises(WeightUpdateError):
        parse_dtype("float99")


def test_protocol_models():
    """Request models take the shapes clients send and refuse wrong types / unknown keys."""
    assert GenerateRequest(input_ids=[[1, 2], [3]]).input_ids == [[1, 2], [3]]
    assert GenerateRequest.model_validate({"text": "hi", "extra": 1}).text == "hi"  # ignored key
    with pytest.raises(pydantic.ValidationError):
        SGLangSamplingParams.model_validate({"max_new_tokens": 4, "bogus": 1})
    assert SGLangSamplingParams.model_validate({"temperature": None}).temperature is None
    assert CompletionRequest(prompt=[1, 2]).max_tokens == 16
    for bad in ({"prompt": 3}, {"prompt": [1], "temperature": -1}, {"prompt": [1], "n": 0}):
        with pytest.raises(pydantic.ValidationError):
            CompletionRequest.model_validate(bad)
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})


def test_entropy_buckets():
    """entropy_bucket labels an entropy with the bucket holding it (0.0 -> "0.00-0.25",
    0.7 -> "0.50-1.00"); entropies past the last edge go to "4.00-inf"."""
    assert entropy_bucket(0.0) == "0.00-0.25" and entropy_bucket(0.7) == "0.50-1.00"
    assert entropy_bucket(9.0) == "4.00-inf"


def test_metrics_render_step_stats():
    """An observed StepStats lands in the spec counters, per-position and per-entropy
    counters, and the entropy histogram."""
    engine = SimpleNamespace(
        config=EngineConfig(model="x", draft_mode="to"), num_running=2, num_waiting=1, version=3,
        weight_version="v3", spec_totals=SpecStats(), add_observer=lambda fn: None,
    )  # fmt: skip
    m = ServerMetrics(engine, "tiny")
    m.observe_step(StepStats(draft_mode="to", num_prompt_tokens=5, num_generated_tokens=4, num_drafts=2,
                             num_draft_tokens=6, num_accepted_tokens=3, accepted_per_pos=[2, 1, 0],
                             verified_entropies=[0.1, 0.1, 2.5, 5.0], verified_accepted=[True, True, True, False]))  # fmt: skip
    text = m.render().decode()
    expect = [
        'bebop:spec_decode_num_drafts_total{model_name="tiny"} 2.0',
        'bebop:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="1"} 1.0',
        'bebop:spec_decode_verified_tokens_by_entropy_total{entropy_bucket="0.00-0.25",model_name="tiny"} 2.0',
        'bebop:spec_decode_accepted_tokens_by_entropy_total{entropy_bucket="4.00-inf",model_name="tiny"} 0.0',
        'bebop:spec_decode_target_entropy_count{model_name="tiny"} 4.0',
        'bebop:spec_decode_draft_mode_info{draft_mode="to",model_name="tiny"} 1.0',
        'bebop:num_requests_running{model_name="tiny"} 2.0',
        'bebop:weight_version{model_name="tiny"} 3.0',
        'bebop:weight_version_info{model_name="tiny",version="v3"} 1.0',
        'bebop:prompt_tokens_total{model_name="tiny"} 5.0',
    ]
    for line in expect:
        assert line in text, line
    assert "_created" not in text


def test_server_config_refuses_open_admin_off_loopback():
    """No token + non-loopback host is refused unless explicitly allowed."""
    with pytest.raises(ValueError, match="admin token"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", admin_token="t").admin_protected
    assert not ServerConfig(host="0.0.0.0", allow_unauthenticated_admin=True).admin_protected
    assert not ServerConfig(host="::1").admin_protected
