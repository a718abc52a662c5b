"""Hot weight sync against a real uvicorn server: every path changes greedy output to
exactly what the new weights produce offline, records the version on each token, and any
malformed update leaves outputs and version unchanged."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.server.testing import free_port, serve_model
from bebop_spec.testing import make_tiny_model

PROMPT = [3, 1, 4, 1, 5]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return [make_tiny_model(root / f"m{i}", vocab_size=64, seed=10 * i + 1) for i in range(3)]


@pytest.fixture(scope="module")
def server(models):
    with serve_model(str(models[0]), str(models[0] / "mtp")) as (srv, state):
        yield srv, state


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, timeout=120) as c:
        yield c


@pytest.fixture(autouse=True)
def fresh_weights(server, http, models):
    """Each test starts from m0's target labelled "default", unpaused, with no group or
    update session left over: tests run in random order (pytest-randomly)."""
    srv, state = server
    if state.engine.paused:
        http.post("/continue_generation", json={})
    state.weights.session = None
    for name in list(state.weights.groups):
        http.post("/destroy_weights_update_group", json={"group_name": name})
    r = http.post("/update_weights_from_disk", json={"model_path": str(models[0]), "selector": "target",
                                                     "weight_version": "default"})  # fmt: skip
    assert r.status_code == 200, r.text


def offline_greedy(target: Path, mtp: Path) -> list[int]:
    llm = LLM(str(target), mtp=str(mtp))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate([PROMPT], params)[0].outputs[0].token_ids


def greedy(http: httpx.Client) -> dict:
    return http.post("/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY}).json()


def version(http: httpx.Client) -> str:
    return http.get("/get_weight_version").json()["weight_version"]


def target_tensors(model: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(model / "model.safetensors"))


def test_update_from_disk(http, models):
    """/update_weights_from_disk swaps the target; greedy output becomes the offline output
    of the new weights (draft head kept), and tokens carry the new version label."""
    assert greedy(http)["output_ids"] == offline_greedy(models[0], models[0] / "mtp")
    r = http.post("/update_weights_from_disk", json={"model_path": str(models[1]), "weight_version": "disk-1",
                                                     "selector": "target"})  # fmt: skip
    assert r.status_code == 200 and r.json()["success"], r.text
    out = greedy(http)
    assert out["output_ids"] == offline_greedy(models[1], models[0] / "mtp")
    assert out["meta_info"]["weight_versions"] == [{"version": "disk-1", "start": 0, "end": 12}]
    assert version(http) == "disk-1"


@pytest.mark.parametrize(
    "case",
    [
        "bad_shape",
        "nan",
        "unknown_name",
        "int_dtype",
        "garbage_bytes",
        "pickle_json",
        "missing_dir",
        "no_group",
        "both_forms",
    ],
)
def test_malformed_update_changes_nothing(http, models, case):
    """Each malformed update is refused with 4xx (SGLang body + OpenAI error); the version and
    greedy output stay what they were."""
    before, v0 = greedy(http)["output_ids"], version(http)
    t = {k: v.clone() for k, v in list(target_tensors(models[2]).items())[:3]}
    name = next(iter(t))
    octet = {"content-type": "application/octet-stream"}
    if case == "bad_shape":
        t[name] = torch.zeros(3, 3)
    elif case == "nan":
        t[name][0] = float("nan")  # the other tensors are fine: still nothing may change
    elif case == "unknown_name":
        t["model.layers.99.mlp.up_proj.weight"] = torch.zeros(2)
    elif case == "int_dtype":
        t[name] = t[name].to(torch.int32)
    if case in ("bad_shape", "nan", "unknown_name", "int_dtype"):
        r = http.post(
            "/update_weights_from_tensor", content=safetensors.torch.save(t), headers=octet
        )
    elif case == "garbage_bytes":
        r = http.post(
            "/update_weights_from_tensor",
            content=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
            headers=octet,
        )
    elif case == "pickle_json":
        blob = base64.b64encode(b"\x80\x04\x95...pickle...").decode()
        r = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": [blob]})
    elif case == "missing_dir":
        r = http.post("/update_weights_from_disk", json={"model_path": "/nonexistent/dir"})
    elif case == "both_forms":  # singular (old SGLang) and plural fields together
        r = http.post("/update_weights_from_distributed",
                      json={"names": [name], "dtypes": ["float32"], "shapes": [[1]], "name": name})  # fmt: skip
    else:
        r = http.post("/update_weights_from_distributed",
                      json={"names": [name], "dtypes": ["float32"], "shapes": [[1]], "group_name": "nope"})  # fmt: skip
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["message"]
    assert version(http) == v0 and greedy(http)["output_ids"] == before


def test_tensor_push_draft_only_and_json_form(http, models):
    """selector=draft replaces only the MTP head (greedy output unchanged, version moves);
    SGLang's JSON form with base64 safetensors updates the target; both inside optional
    begin/end_weight_update brackets (SGLang 0.5.23)."""
    before = greedy(http)["output_ids"]
    assert http.post("/end_weight_update", json={}).status_code == 400  # no session open
    assert http.post("/begin_weight_update", json={"selector": "all"}).json()["success"]
    head = safetensors.torch.load_file(str(models[2] / "mtp" / "model.safetensors"))
    r = http.post("/update_weights_from_tensor?selector=draft&weight_version=draft-1",
                  content=safetensors.torch.save(head), headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert r.json()["success"] and r.json()["weight_version"] == "draft-1", r.text
    assert greedy(http)["output_ids"] == before
    blob = base64.b64encode(safetensors.torch.save(target_tensors(models[2]))).decode()
    r = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": [blob], "selector": "target",
                                                       "weight_version": "json-1"})  # fmt: skip
    assert r.json()["success"], r.text
    assert http.post("/end_weight_update", json={}).json()["success"]
    assert greedy(http)["output_ids"] == offline_greedy(models[2], models[2] / "mtp")


TRAINER = r"""
import json, sys, threading, httpx, safetensors.torch, torch, torch.distributed as dist
from bebop_spec.server.weight_sync.group import init_custom_process_group
url, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = httpx.Client(base_url=url, timeout=120)
results = []
def post(route, body):
    results.append((route, c.post(route, json=body)))
t = threading.Thread(target=post, args=("/init_weights_update_group", {"master_address": "127.0.0.1",
    "master_port": port, "rank_offset": 1, "world_size": 2, "group_name": "wg", "backend": "gloo"}))
t.start()
pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "wg")
t.join()
tensors = safetensors.torch.load_file(path)
def update(named, version, flat):
    meta = {"names": list(named), "dtypes": [str(v.dtype).replace("torch.", "") for v in named.values()],
            "shapes": [list(v.shape) for v in named.values()], "group_name": "wg", "weight_version": version,
            "selector": "target", "load_format": "flattened_bucket" if flat else None}
    t = threading.Thread(target=post, args=("/update_weights_from_distributed", meta)); t.start()
    if flat:
        dist.broadcast(torch.cat([v.flatten().view(torch.uint8) for v in named.values()]), src=0, group=pg)
    else:
        for v in named.values():
            dist.broadcast(v, src=0, group=pg)
    t.join()
bad = dict(tensors); bad["model.layers.42.bogus.weight"] = torch.zeros(4)
update(bad, "bad", False)                                            # refused, group still usable
update({k: v.to(torch.bfloat16) for k, v in tensors.items()}, "bf16", True)  # bucket, cast to fp32
update(tensors, "gloo-0", False)                                     # one broadcast per tensor
first = next(iter(tensors))                                          # older single-tensor form
t = threading.Thread(target=post, args=("/update_weights_from_distributed", {"name": first,
    "dtype": "float32", "shape": list(tensors[first].shape), "group_name": "wg",
    "weight_version": "gloo-1", "selector": "target"})); t.start()
dist.broadcast(tensors[first], src=0, group=pg); t.join()
post("/destroy_weights_update_group", {"group_name": "wg"})
dist.destroy_process_group(pg)
print(json.dumps([(route, r.status_code, r.json()) for route, r in results]))
"""


def test_update_over_gloo_group(server, http, models):
    """A trainer process forms the group as SGLang's init_custom_process_group (rank 0) and
    broadcasts: a bad bucket is refused without desynchronising the group, a flattened bf16
    bucket, a per-tensor update and one in the older single-tensor form (name/dtype/shape,
    as SkyRL sends) are applied; greedy output = offline new weights."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", TRAINER, server[0].url, str(port), str(models[1] / "model.safetensors")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(route, code) for route, code, _ in res] == [
        ("/init_weights_update_group", 200), ("/update_weights_from_distributed", 400),
        ("/update_weights_from_distributed", 200), ("/update_weights_from_distributed", 200),
        ("/update_weights_from_distributed", 200), ("/destroy_weights_update_group", 200),
    ]  # fmt: skip
    assert "bogus" in res[1][2]["message"]
    assert version(http) == "gloo-1"
    out = greedy(http)
    assert out["output_ids"] == offline_greedy(models[1], models[2] / "mtp")
    assert out["meta_info"]["weight_version"] == "gloo-1"


def test_versions_recorded_per_token_across_an_update(server, http, models):
    """A request paused in place mid-generation, updated, then resumed reports two version
    spans covering its tokens: the old weights' prefix and the new weights' suffix."""
    srv, state = server
    old = version(http)

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            body = {
                "input_ids": PROMPT,
                "stream": True,
                "sampling_params": {"max_new_tokens": 300, "ignore_eos": True},
            }
            last = None
            async with c.stream("POST", "/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    last = json.loads(line[6:])
                    if (
                        len(last["output_ids"]) >= 3
                        and state.engine.version_labels.get(state.engine.version) == old
                    ):
                        await c.post("/pause_generation", json={"mode": "in_place"})
                        r2 = await c.post(
                            "/update_weights_from_disk",
                            json={"model_path": str(models[0]), "weight_version": "mid"},
                        )
                        assert r2.json()["success"], r2.text
                        await c.post("/continue_generation", json={})
            return last

    out = asyncio.run(run())
    spans = out["meta_info"]["weight_versions"]
    assert [s["version"] for s in spans] == [old, "mid"]
    assert (
        spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] and spans[1]["end"] == 300
    )


def test_update_weight_version_relabels_without_touching_weights(http):
    """/update_weight_version (SGLang) renames the serving version; greedy output is the same
    and new tokens carry the new label, as does the bebop:weight_version_info gauge (one
    series, the new label); an empty label is a 4xx."""
    before = greedy(http)
    r = http.post("/update_weight_version", json={"new_version": "relabelled-7"})
    assert r.status_code == 200 and r.json()["new_version"] == "relabelled-7"
    assert version(http) == "relabelled-7"
    after = greedy(http)
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["weight_version"] == "relabelled-7"
    info = [x for x in http.get("/metrics").text.splitlines()
            if x.startswith("bebop:weight_version_info{")]  # fmt: skip
    assert len(info) == 1 and 'version="relabelled-7"' in info[0], info
    assert http.post("/update_weight_version", json={"new_version": ""}).status_code in (400, 422)


SKYRL = r"""
import json, sys, threading, httpx, safetensors.torch, torch, torch.distributed as dist
from bebop_spec.server.weight_sync.group import init_custom_process_group
url, ports, path = sys.argv[1], [int(p) for p in sys.argv[2:4]], sys.argv[4]
c = httpx.Client(base_url=url, timeout=120)
results = []
def post(route, body=None):
    r = c.post(route, json=body) if body is not None else c.post(route)
    results.append((route, r.status_code, r.json()))
tensors = safetensors.torch.load_file(path)
for port in ports:  # two rounds: teardown must free the group, so the next init works
    # RemoteWeightLoader.init_communicator (backend sglang): SkyRL names its group "skyrl"
    t = threading.Thread(target=post, args=("/init_weights_update_group", {"master_address": "127.0.0.1",
        "master_port": port, "rank_offset": 1, "world_size": 2, "group_name": "skyrl", "backend": "gloo"}))
    t.start()
    pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "skyrl")
    t.join()
    for name, v in tensors.items():  # load_weights: one tensor, singular fields, no group_name
        body = {"name": name, "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
        t = threading.Thread(target=post, args=("/update_weights_from_distributed", body)); t.start()
        dist.broadcast(v, src=0, group=pg); t.join()
    post("/destroy_weights_update_group")  # destroy_group: POST without a body
    dist.destroy_process_group(pg)
print(json.dumps(results))
"""


def test_skyrl_weight_sync_uses_the_one_group(server, http, models):
    """SkyRL's SGLang backend, its exact calls (skyrl_train RemoteWeightLoader): a group
    named "skyrl", then one /update_weights_from_distributed per tensor with {name, dtype,
    shape} and no group_name, then /destroy_weights_update_group with no body — twice, so
    the teardown must really free the group. Every call is 200 (SGLang uses its one group
    whatever the name), no broadcast blocks, and greedy output = the pushed weights."""
    srv, state = server
    ports = [str(free_port()), str(free_port())]
    path = str(models[2] / "model.safetensors")
    proc = subprocess.run([sys.executable, "-c", SKYRL, srv.url, *ports, path], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(code == 200 for _, code, _ in res), [(r, c, b) for r, c, b in res if c != 200]
    n = len(target_tensors(models[2]))
    assert [route for route, *_ in res] == 2 * (
        ["/init_weights_update_group"] + ["/update_weights_from_distributed"] * n
        + ["/destroy_weights_update_group"]
    )  # fmt: skip
    assert state.weights.groups == {}
    assert greedy(http)["output_ids"] == offline_greedy(models[2], models[0] / "mtp")


def test_group_name_resolution():
    """The name rule on its own: an exact name wins, else the only group, else a 400 that
    lists the groups (two groups and an unknown name are ambiguous)."""
    from types import SimpleNamespace

    from bebop_spec.server.errors import ApiError
    from bebop_spec.server.serving.weights import WeightServing

    w = WeightServing.__new__(WeightServing)
    w.groups = {"skyrl": object()}
    assert w._group_name(None) == w._group_name("weight_update_group") == "skyrl"
    w.groups["other"] = SimpleNamespace()
    assert w._group_name("other") == "other"
    with pytest.raises(ApiError, match="skyrl"):
        w._group_name(None)
    w.groups = {}
    with pytest.raises(ApiError, match="first"):
        w._group_name("skyrl")


def test_pickled_tensor_update_says_pickle_is_never_accepted(http, models):
    """SGLang's default /update_weights_from_tensor payload (base64 of a pickle of
    [(name, tensor)], as MultiprocessingSerializer writes it) and a torch.save body are
    refused with a message that names pickle and says it is never accepted; nothing moves."""
    import io
    import pickle

    before, v0 = greedy(http)["output_ids"], version(http)
    name, t = next(iter(target_tensors(models[2]).items()))
    blob = base64.b64encode(pickle.dumps([(name, t)], protocol=4)).decode()
    r = http.post("/update_weights_from_tensor",
                  json={"serialized_named_tensors": [blob], "load_format": None, "flush_cache": True})  # fmt: skip
    assert r.status_code == 400 and "pickle (protocol 4)" in r.json()["message"]
    assert "never accepted" in r.json()["message"] and "malformed" not in r.json()["message"]
    buf = io.BytesIO()
    torch.save({name: t}, buf)
    r = http.post("/update_weights_from_tensor", content=buf.getvalue(),
                  headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 400 and "torch.save" in r.json()["message"]
    assert "never accepted" in r.json()["message"]
    assert version(http) == v0 and greedy(http)["output_ids"] == before


def test_update_without_weight_version_keeps_the_label(http, models):
    """An update that names no weight_version keeps the serving label (as SGLang does),
    instead of replacing it with the internal counter; the weights do change."""
    v0 = version(http)
    blob = base64.b64encode(safetensors.torch.save(target_tensors(models[1]))).decode()
    r = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": [blob]})
    assert r.status_code == 200 and r.json()["weight_version"] == v0, r.text
    assert version(http) == v0
    out = greedy(http)
    assert out["output_ids"] == offline_greedy(models[1], models[0] / "mtp")
    assert out["meta_info"]["weight_versions"] == [{"version": v0, "start": 0, "end": 12}]


VLLM_TRAINER = r"""
import json, sys, threading, httpx, safetensors.torch, torch, torch.distributed as dist
from bebop_spec.server.weight_sync.group import init_custom_process_group
url, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = httpx.Client(base_url=url, timeout=120)
results = []
def post(route, body=None):
    r = c.post(route, json=body) if body is not None else c.post(route)
    results.append((route, r.status_code, r.json()))
tensors = safetensors.torch.load_file(path)
info = {"names": list(tensors), "dtype_names": [str(v.dtype).replace("torch.", "") for v in tensors.values()],
        "shapes": [list(v.shape) for v in tensors.values()], "packed": False}
post("/update_weights", {"update_info": info})                      # before init: 400, no broadcast
t = threading.Thread(target=post, args=("/init_weight_transfer_engine", {"init_info": {
    "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}}))
t.start()
pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "weight_update_group")
t.join()
post("/start_weight_update")
post("/update_weights", {"update_info": info | {"packed": True}})   # refused before any broadcast
t = threading.Thread(target=post, args=("/update_weights", {"update_info": info})); t.start()
for v in tensors.values():
    dist.broadcast(v, src=0, group=pg)
t.join()
post("/finish_weight_update", {"weight_version": "vllm-1"})
post("/destroy_weights_update_group")
dist.destroy_process_group(pg)
print(json.dumps(results))
"""


def test_vllm_four_phase_weight_transfer(server, http, models):
    """vLLM's RL weight API (SkyRL's RemoteInferenceClient, TRL) mapped onto the group
    mechanism: init_weight_transfer_engine {init_info} -> start_weight_update ->
    update_weights {update_info} (one broadcast per tensor) -> finish_weight_update
    {weight_version}; /weight_info reports the label and greedy output = the pushed weights.
    update_weights before the group exists and packed=true are 400, both before any
    broadcast, so the group stays in step."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", VLLM_TRAINER, server[0].url, str(port),
                           str(models[2] / "model.safetensors")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(route, code) for route, code, _ in res] == [
        ("/update_weights", 400), ("/init_weight_transfer_engine", 200),
        ("/start_weight_update", 200), ("/update_weights", 400), ("/update_weights", 200),
        ("/finish_weight_update", 200), ("/destroy_weights_update_group", 200),
    ]  # fmt: skip
    assert res[1][2] == {"message": "Weight transfer initialized"}
    assert res[5][2] == {"message": "Weight update finished"}
    assert http.get("/weight_info").json() == {"weight_version": "vllm-1"}
    assert greedy(http)["output_ids"] == offline_greedy(models[2], models[0] / "mtp")


def test_vllm_weight_checker(http, server, models):
    """/weight_checker as vLLM: checksum gives one SHA-256 per target weight, keyed
    `dp0:pp0:pcp0:tp0:<name>`, equal to the digest of the checkpoint's own tensor; compare
    against that baseline matches, and after reset (zeroed weights: greedy output changes,
    label kept) it lists every weight as a mismatch; compare without a baseline and a bad
    action are 400."""
    import hashlib

    from safetensors.torch import load_file

    http.post(
        "/update_weights_from_disk", json={"model_path": str(models[0]), "selector": "target"}
    )
    before, label = greedy(http)["output_ids"], version(http)
    sums = http.post("/weight_checker", json={"action": "checksum"}).json()["checksums"]
    disk = load_file(str(models[0] / "model.safetensors"))
    key = "dp0:pp0:pcp0:tp0:model.embed_tokens.weight"
    dtype = server[1].engine.weight_spec("target")["model.embed_tokens.weight"][1]  # as served
    t = disk["model.embed_tokens.weight"].to(dtype).contiguous().view(-1).view(torch.uint8).numpy()
    assert sums[key] == hashlib.sha256(t).hexdigest() and len(sums) >= len(disk) - 1
    same = http.post("/weight_checker", json={"action": "compare", "baseline": sums}).json()
    assert same == {"match": True, "mismatches": []}
    assert http.post("/weight_checker", json={"action": "reset"}).json() == {"status": "reset"}
    assert greedy(http)["output_ids"] != before and version(http) == label
    diff = http.post("/weight_checker", json={"action": "compare", "baseline": sums}).json()
    assert diff["match"] is False and set(diff["mismatches"]) == set(sums)
    assert http.post("/weight_checker", json={"action": "compare"}).status_code == 400
    assert http.post("/weight_checker", json={"action": "nope"}).status_code == 400
    r = http.post(
        "/update_weights_from_disk", json={"model_path": str(models[2]), "selector": "target"}
    )
    assert r.json()["success"]
    assert greedy(http)["output_ids"] == offline_greedy(models[2], models[0] / "mtp")
