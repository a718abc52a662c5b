"""Weight-update faults the per-case tests in test_server_weights.py do not cover: a trainer
killed mid-broadcast, concurrent updates, a refused and an accepted update while 100
requests stream, and pickle payloads on every path that takes bytes.

Invariant of every fault: the serving weights are bit-for-bit the old ones (SHA-256 over
every target and MTP parameter), the version label does not move, and nothing deadlocks —
each step has a bounded wait (the group's timeout is 20 s here; a dead peer is detected
well before it). A successful update serves exactly the file's tensors.

Run: python -m pytest -q tests/server/test_reliability_weights.py
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from bebop_spec.server.testing import free_port, serve_model
from bebop_spec.testing import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
GROUP_TIMEOUT_S = 20.0
OCTET = {"content-type": "application/octet-stream"}
GREEDY = {"input_ids": [3, 1, 4, 1, 5], "sampling_params": {"temperature": 0, "max_new_tokens": 8}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("relw")
    return [make_tiny_model(root / f"m{i}", vocab_size=64, seed=100 + i) for i in range(3)]


@pytest.fixture(scope="module")
def server(models):
    engine = {"max_num_seqs": 64, "max_model_len": 128}
    with serve_model(str(models[0]), str(models[0] / "mtp"), engine=engine,
                     server={"group_timeout_s": GROUP_TIMEOUT_S}) as (srv, state):  # fmt: skip
        yield srv, state


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, timeout=120) as c:
        yield c


def checksum(state) -> str:
    """SHA-256 over every serving parameter (target, then MTP head), names included."""
    runner = state.engine.engine.runner
    h = hashlib.sha256()
    for prefix, module in (("t", runner.target), ("d", runner.mtp)):
        for name, p in sorted(module.named_parameters()) if module is not None else ():
            h.update(f"{prefix}.{name}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def serves_exactly(state, path: Path) -> bool:
    """Every tensor of the target checkpoint at `path` equals the served parameter."""
    served = dict(state.engine.engine.runner.target.named_parameters())
    file = safetensors.torch.load_file(str(path / "model.safetensors"))
    return all(torch.equal(served[k].detach(), v.to(served[k].dtype)) for k, v in file.items())


def version(http: httpx.Client) -> str:
    return http.get("/get_weight_version").json()["weight_version"]


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------ trainer killed mid-broadcast
DYING_TRAINER = r"""
import sys, threading, httpx, safetensors.torch, torch, torch.distributed as dist
from bebop_spec.server.weight_sync.group import init_custom_process_group
url, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = httpx.Client(base_url=url, timeout=300)
body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": "rel", "backend": "gloo"}
t = threading.Thread(target=lambda: print("init", c.post("/init_weights_update_group", json=body).status_code, flush=True))
t.start()
pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "rel")
t.join()
tensors = safetensors.torch.load_file(path)
meta = {"names": list(tensors), "dtypes": ["float32"] * len(tensors), "group_name": "rel",
        "shapes": [list(v.shape) for v in tensors.values()], "weight_version": "never", "selector": "target"}
threading.Thread(target=lambda: c.post("/update_weights_from_distributed", json=meta), daemon=True).start()
first = next(iter(tensors.values()))
dist.broadcast(first, src=0, group=pg)        # the server is now inside the receive
print("half-sent", flush=True)
threading.Event().wait()                      # the test kills us here (SIGKILL)
"""

GOOD_TRAINER = r"""
import json, sys, threading, httpx, safetensors.torch, torch, torch.distributed as dist
from bebop_spec.server.weight_sync.group import init_custom_process_group
url, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = httpx.Client(base_url=url, timeout=300)
out = {}
body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": "rel", "backend": "gloo"}
t = threading.Thread(target=lambda: out.update(init=c.post("/init_weights_update_group", json=body).status_code))
t.start()
pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, "rel")
t.join()
tensors = safetensors.torch.load_file(path)
meta = {"names": list(tensors), "dtypes": ["float32"] * len(tensors), "group_name": "rel",
        "shapes": [list(v.shape) for v in tensors.values()], "weight_version": "recovered", "selector": "target"}
t = threading.Thread(target=lambda: out.update(update=c.post("/update_weights_from_distributed", json=meta).json()))
t.start()
for v in tensors.values():
    dist.broadcast(v, src=0, group=pg)
t.join()
out["destroy"] = c.post("/destroy_weights_update_group", json={"group_name": "rel"}).status_code
dist.destroy_process_group(pg)
print(json.dumps(out))
"""


def test_trainer_killed_mid_broadcast_recovers(server, http, models):
    """SIGKILL the rank-0 trainer after 1 of N broadcasts: the server's receive fails within
    the group timeout (20 s; in practice at once, gloo sees the peer close), the weights and
    version are unchanged, generation keeps working throughout, the dead group can be
    destroyed (<= 20 s) and a new group with the same name then applies an update."""
    srv, state = server
    before, v0, out0 = checksum(state), version(http), http.post("/generate", json=GREEDY).json()
    port = free_port()
    trainer = subprocess.Popen(
        [sys.executable, "-c", DYING_TRAINER, srv.url, str(port), str(models[1] / "model.safetensors")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = iter(trainer.stdout.readline, "")
        assert next(lines).split() == ["init", "200"]
        assert next(lines).strip() == "half-sent"
        wait_for(lambda: state.weights.lock.locked(), 10, "the server to be inside the receive")
        assert http.post("/generate", json=GREEDY).json()["output_ids"] == out0["output_ids"]
        t0 = time.monotonic()
        os.kill(trainer.pid, signal.SIGKILL)
        wait_for(
            lambda: not state.weights.lock.locked(), GROUP_TIMEOUT_S + 10, "the receive to fail"
        )
        failed_after = time.monotonic() - t0
    finally:
        trainer.kill()
    assert checksum(state) == before and version(http) == v0
    t0 = time.monotonic()
    r = http.post(
        "/destroy_weights_update_group", json={"group_name": "rel"}, timeout=GROUP_TIMEOUT_S + 10
    )
    destroyed_after = time.monotonic() - t0
    assert r.status_code == 200, r.text
    print(
        f"\nreceive failed {failed_after:.2f} s after the kill; destroy took {destroyed_after:.2f} s"
    )
    proc = subprocess.run(
        [sys.executable, "-c", GOOD_TRAINER, srv.url, str(free_port()), str(models[1] / "model.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["init"] == 200 and res["update"]["success"] and res["destroy"] == 200, res
    assert version(http) == "recovered" and serves_exactly(state, models[1])


# ------------------------------------------------------------------ concurrent updates
def test_concurrent_updates_serialise(server, http, models):
    """Two valid updates (HTTP push of m2, disk load of m0) and a NaN one posted at the same
    time: the NaN one is refused, the two valid ones both succeed one after the other, and the
    weights served at the end are exactly the checkpoint of whichever finished last (never a
    mix of the two)."""
    srv, state = server
    bad = safetensors.torch.load_file(str(models[2] / "model.safetensors"))
    next(iter(bad.values()))[0] = float("inf")

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            push = c.post("/update_weights_from_tensor?selector=target&weight_version=push",
                          content=(models[2] / "model.safetensors").read_bytes(), headers=OCTET)  # fmt: skip
            disk = c.post("/update_weights_from_disk", json={"model_path": str(models[0]),
                          "selector": "target", "weight_version": "disk"})  # fmt: skip
            nan = c.post("/update_weights_from_tensor?selector=target&weight_version=nan",
                         content=safetensors.torch.save(bad), headers=OCTET)  # fmt: skip
            return await asyncio.gather(push, disk, nan)

    push, disk, nan = asyncio.run(run())
    assert push.json()["success"] and disk.json()["success"], (push.text, disk.text)
    assert nan.status_code == 400 and nan.json()["success"] is False, nan.text
    last = version(http)
    assert last in ("push", "disk")
    assert serves_exactly(state, models[2] if last == "push" else models[0])


# ------------------------------------------------------------------ updates during 100 streams
def test_updates_while_100_requests_stream(server, http, models):
    """100 streamed requests (40 tokens each, 64 running + 36 waiting). Mid-stream a refused
    update (wrong shape) leaves the checksum equal; then a valid update is applied. All 100
    finish with 200 and no error event, each reports contiguous version spans covering its
    40 tokens (old label before new), and the new weights are served exactly."""
    srv, state = server
    http.post(
        "/update_weights_from_disk", json={"model_path": str(models[0]), "weight_version": "base"}
    )
    before, n, tokens = checksum(state), 100, 40
    wrong = safetensors.torch.load_file(str(models[1] / "model.safetensors"))
    wrong[next(iter(wrong))] = torch.zeros(3, 3)

    async def one(c: httpx.AsyncClient, i: int, started: list) -> dict:
        body = {"input_ids": [1 + i % 50, 2, 3], "stream": True,
                "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}  # fmt: skip
        last, events = None, []
        async with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if line.startswith("data: {"):
                        last = json.loads(line[6:])
                        if not started[i]:
                            started[i] = True
        return {"events": events, "last": last}

    async def run():
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c:
            started = [False] * n
            tasks = [asyncio.create_task(one(c, i, started)) for i in range(n)]
            while sum(started) < 64:  # every running slot is mid-stream
                await asyncio.sleep(0.02)
            r_bad = await c.post("/update_weights_from_tensor?selector=target&weight_version=bad",
                                 content=safetensors.torch.save(wrong), headers=OCTET)  # fmt: skip
            sum_after_bad = checksum(state)
            r_good = await c.post("/update_weights_from_tensor?selector=target&weight_version=new",
                                  content=(models[1] / "model.safetensors").read_bytes(), headers=OCTET)  # fmt: skip
            return r_bad, sum_after_bad, r_good, await asyncio.gather(*tasks)

    r_bad, sum_after_bad, r_good, results = asyncio.run(run())
    assert r_bad.status_code == 400 and sum_after_bad == before
    assert r_good.json()["success"], r_good.text
    for res in results:
        assert res["events"][-1] == "data: [DONE]"
        assert not any('"error"' in e for e in res["events"])
        spans = res["last"]["meta_info"]["weight_versions"]
        assert spans[0]["start"] == 0 and spans[-1]["end"] == tokens
        assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:], strict=False))
        assert [s["version"] for s in spans] in (["base"], ["new"], ["base", "new"])
    assert sum(len(r["last"]["meta_info"]["weight_versions"]) == 2 for r in results) > 0
    assert version(http) == "new" and serves_exactly(state, models[1])
    wait_for(lambda: state.engine.num_running + state.engine.num_waiting == 0, 10, "idle")


# ------------------------------------------------------------------ pickle is never unpickled
class _Trap:
    """Unpickling this creates a directory: proof that something called pickle.loads."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_payload_is_never_unpickled(server, http, tmp_path):
    """A pickle whose loading would run code (os.mkdir of a marker), sent as a raw tensor
    body, as SGLang's base64 JSON entry (also SGLang's own pickle form), and as a checkpoint
    on disk (a *.safetensors that is a pickle, and a torch.save pytorch_model.bin): every one
    is refused with 400, the marker is never created, weights and version are unchanged."""
    srv, state = server
    before, v0 = checksum(state), version(http)
    marker = tmp_path / "unpickled"
    blob = pickle.dumps({"model.embed_tokens.weight": _Trap(marker)})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(blob)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "pytorch_model.bin").write_bytes(blob)
    replies = [
        http.post("/update_weights_from_tensor", content=blob, headers=OCTET),
        http.post("/update_weights_from_tensor",
                  json={"serialized_named_tensors": [base64.b64encode(blob).decode()]}),
        http.post("/update_weights_from_tensor", json={"serialized_named_tensors": [base64.b64encode(
            pickle.dumps([("model.embed_tokens.weight", _Trap(marker))])).decode()], "load_format": "direct"}),
        http.post("/update_weights_from_disk", json={"model_path": str(ckpt)}),
        http.post("/update_weights_from_disk", json={"model_path": str(binary)}),
    ]  # fmt: skip
    for r in replies:
        assert r.status_code == 400 and r.json()["success"] is False, r.text
    assert not marker.exists()
    assert checksum(state) == before and version(http) == v0
    assert http.get("/health").status_code == 200


# ------------------------------------------------------------------ truncated uploads
def test_truncated_uploads_change_nothing(server, http, models):
    """A safetensors body cut short (declared length honest; 1 byte, half, or all but 7
    missing) is a 400; a client that declares N bytes, sends N/2 and hangs up changes
    nothing. Weights and version unchanged in every case; the whole file then applies."""
    import socket

    srv, state = server
    before, v0 = checksum(state), version(http)
    data = (models[2] / "model.safetensors").read_bytes()
    for cut in (data[:-1], data[: len(data) // 2], data[:7]):
        r = http.post("/update_weights_from_tensor", content=cut, headers=OCTET)
        assert r.status_code == 400 and r.json()["success"] is False, r.text
    head = (f"POST /update_weights_from_tensor HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.2)
    time.sleep(0.2)
    wait_for(lambda: not state.weights.lock.locked(), 10, "the aborted upload to be dropped")
    assert checksum(state) == before and version(http) == v0
    assert http.post("/generate", json=GREEDY).status_code == 200
    r = http.post("/update_weights_from_tensor?selector=target&weight_version=whole",
                  content=data, headers=OCTET)  # fmt: skip
    assert r.json()["success"] and serves_exactly(state, models[2])  # nothing is stuck
