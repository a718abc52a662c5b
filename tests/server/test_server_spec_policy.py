"""The auto speculation policy as the server shows it: the chosen draft lengths as a Prometheus
histogram and in /get_server_info, both counting every decode step exactly once."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bebop_spec.server.testing import serve_model


def test_draft_length_histogram_and_server_info(tiny_model):
    """After one request of 30 tokens: the histogram's count equals the decode steps the
    server info reports (per-γ counts), le=0 counts the plain steps, and the policy is auto."""
    with serve_model(str(tiny_model), str(tiny_model / "mtp")) as (srv, _):
        body = {
            "input_ids": [1, 2, 3],
            "sampling_params": {"max_new_tokens": 30, "ignore_eos": True},
        }
        assert httpx.post(srv.url + "/generate", json=body, timeout=60).status_code == 200
        info = httpx.get(srv.url + "/get_server_info").json()
        steps = info["internal_states"][0]["spec_draft_length_steps"]
        text = httpx.get(srv.url + "/metrics").text
    assert info["spec_policy"] == "auto" and len(steps) == 4 and sum(steps) > 0
    fam = next(f for f in text_string_to_metric_families(text)
               if f.name == "bebop:spec_decode_draft_length")  # fmt: skip
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    count = next(s.value for s in fam.samples if s.name.endswith("_count"))
    assert count == sum(steps) and buckets["0.0"] == steps[0]


def test_kv_cache_metrics_and_server_info(tiny_model):
    """Two requests with one 40-token prompt (n = 2 each): the prefix-cache counters count
    every prefill token queried and the shared blocks' tokens as hits, the KV gauges add up
    to the pool, and /get_server_info reports the same pool."""
    with serve_model(str(tiny_model), str(tiny_model / "mtp")) as (srv, _):
        body = {"input_ids": list(range(3, 43)), "sampling_params": {
            "max_new_tokens": 4, "ignore_eos": True, "n": 2}}  # fmt: skip
        for _ in range(2):
            assert httpx.post(srv.url + "/generate", json=body, timeout=60).status_code == 200
        kv = httpx.get(srv.url + "/get_server_info").json()["internal_states"][0]["kv_cache"]
        text = httpx.get(srv.url + "/metrics").text
    values = {(s.name, s.labels.get("state")): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    shared = (40 - 1) // kv["block_size"] * kv["block_size"]  # full blocks + a next token
    assert values[("bebop:prefix_cache_queries_total", None)] == 4 * 40
    assert values[("bebop:prefix_cache_hits_total", None)] == 3 * shared
    assert kv["prefix_cache_hit_rate"] == 3 * shared / (4 * 40)
    used, free = (
        values[("bebop:kv_cache_blocks", "used")],
        values[("bebop:kv_cache_blocks", "free")],
    )
    assert used + free == kv["num_blocks"] and values[("bebop:num_preemptions_total", None)] == 0
