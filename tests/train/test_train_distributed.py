"""Data-parallel head training under torchrun (train/distributed.py), 2 gloo ranks on CPU.

Invariants: W ranks taking their rows of each global batch (and the chains drawn from the
whole batch that start in them), with losses weighted by their chain counts n_r / N and
gradients summed, take the optimiser steps one process takes on the whole batch: the heads
agree to 1e-5 (float summation order differs) and the logged losses to 1e-5. That holds with
the target's layers FSDP2-sharded over the ranks and with the hidden states read from the
offline cache. Checkpoints resume across world sizes (1 -> 2 and 2 -> 1). Only rank 0 writes
into the run directory. Each torchrun runs 2 ranks of one thread each (OMP_NUM_THREADS=1).

Run: python -m pytest -q tests/train/test_train_distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bebop_spec.server.testing import free_port
from bebop_spec.testing import make_tiny_model
from bebop_spec.train import trainer as trainer_mod
from bebop_spec.train.data import DistillSample, write_dataset
from bebop_spec.train.hidden_cache import cache_bytes
from bebop_spec.train.trainer import TrainConfig, train_mtp

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, STEPS = 32, 32, 4
ARGS = dict(loss="e2e_tv", gamma=2, lr=3e-3, batch_size=4, seq_len=24, warmup=1,
            log_every=1, chunk_size=7, seed=0)  # fmt: skip

# Run by torchrun instead of `-m bebop_spec.cli`: the same CLI, with an audit hook recording
# every write-like filesystem call under OUT (argv[1]) to RECORD.<rank> (argv[2]).
AUDITED_CLI = """
import json, os, sys
out, record = os.path.realpath(sys.argv[1]), sys.argv[2]
WRITES = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree")
events = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1] or "", args[2] or 0
        if not (set(mode) & set("wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return
    elif event not in WRITES:
        return
    if os.path.realpath(os.fsdecode(args[0])).startswith(out):
        events.append([event, os.fsdecode(args[0])])
sys.addaudithook(hook)
from bebop_spec.cli import main
code = main(sys.argv[3:])
with open(f"{record}.{os.environ['RANK']}", "w") as f:
    json.dump(events, f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target and 12 random sequences (4 prompt + 10..20 response tokens; lengths vary
    so the ranks hold different chain counts)."""
    root = tmp_path_factory.mktemp("ddp")
    model = make_tiny_model(root / "model", vocab_size=VOCAB, hidden_size=HIDDEN, mtp_layout=None)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(12):
        n = 10 + (i * 5) % 11
        ids = torch.randint(0, VOCAB, (4 + n,), generator=gen).tolist()
        samples.append(DistillSample(ids, [0] * 4 + [1] * n, "toy"))
    write_dataset(root / "data", samples, model=str(model), temperature=1.0)
    return model, root / "data"


def _cfg(tiny, out, **kw) -> TrainConfig:
    return TrainConfig(model=str(tiny[0]), data=str(tiny[1]), out=str(out),
                       **(ARGS | {"steps": STEPS, "save_every": 0} | kw))  # fmt: skip


def _torchrun(tiny, out: Path, *extra: str, audit: Path | None = None, **kw) -> str:
    """`mtp train` on 2 gloo ranks (under the audit hook when `audit` is a record prefix)."""
    cfg = ARGS | {"steps": STEPS, "save_every": 0} | kw
    flags = [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    if audit is None:
        entry = ["-m", "bebop_spec.cli"]
    else:
        script = audit.parent / "audited_cli.py"
        script.write_text(AUDITED_CLI)
        entry = [str(script), str(out), str(audit)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), *entry, "mtp", "train", "--model", str(tiny[0]),
           "--data", str(tiny[1]), "--out", str(out), "--resume", "--quiet", "--threads", "1",
           *flags, *extra]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _head(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "head.safetensors"))


def _log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _close(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < tol, worst
    return worst


def _stop_at(step_to_stop: int, monkeypatch) -> None:
    """Make the in-process trainer raise KeyboardInterrupt before step `step_to_stop`."""
    real = trainer_mod.optimizer_step

    def stop(cfg, target, head, opt, batch, step, *args):
        if step == step_to_stop:
            raise KeyboardInterrupt
        return real(cfg, target, head, opt, batch, step, *args)

    monkeypatch.setattr(trainer_mod, "optimizer_step", stop)


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train_mtp(_cfg(tiny, out))
    return out


def test_two_ranks_equal_one_process_and_only_rank_0_writes(tiny, one_process, tmp_path):
    """Same global batch, 2 ranks vs 1 process: heads within 1e-5, per-step logged losses
    within 1e-5 and chain counts equal. Under an audit hook, rank 1 made no write-like call
    (open for writing, mkdir, rename, remove, rmtree) under the run directory, while rank 0
    made some (the hook sees them); the log has exactly one line per step."""
    out = tmp_path / "two"
    _torchrun(tiny, out, audit=tmp_path / "writes")
    rank0 = json.loads((tmp_path / "writes.0").read_text())
    rank1 = json.loads((tmp_path / "writes.1").read_text())
    assert rank1 == []
    assert any(p.endswith("train_log.jsonl") for _, p in rank0)
    assert any(p.endswith("checkpoint.tmp") for _, p in rank0)
    _close(_head(out), _head(one_process))
    two, one = _log(out), _log(one_process)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["num_chains"] for r in two] == [r["num_chains"] for r in one]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two, one, strict=True)) < 1e-5
    assert (out / "head" / "config.json").is_file()


def test_one_process_checkpoint_resumes_on_two_ranks_with_a_sharded_target(
    tiny, one_process, tmp_path, monkeypatch
):
    """One process checkpoints at step 2 and stops; 2 ranks resume it to step 4 with the
    target's layers FSDP2-sharded over them (--shard-target, gloo); the head equals 4
    uninterrupted steps of one process (within 1e-5)."""
    _stop_at(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_mtp(_cfg(tiny, tmp_path / "resumed", save_every=2))
    monkeypatch.undo()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    _torchrun(tiny, tmp_path / "resumed", "--shard-target", save_every=2)
    _close(_head(tmp_path / "resumed"), _head(one_process))


def test_two_ranks_checkpoint_resumes_on_one_process_from_the_hidden_cache(tiny, tmp_path):
    """2 ranks train 2 steps with --max-chains 6 (6 chains drawn from each global batch, not
    6 per rank) from an offline hidden-state cache they build together (one shard file each,
    size tokens × H × 4 B); one process resumes the checkpoint to step 4, reading the same
    cache; the head equals 4 straight steps of one process without a cache (within 1e-5).
    min_lr_ratio=1 keeps the learning rate independent of the total step count."""
    kw = dict(max_chains=6, min_lr_ratio=1.0)
    cache = tmp_path / "cache"
    stdout = _torchrun(tiny, tmp_path / "split", "--cache-hiddens", str(cache), steps=2, **kw)
    meta = json.loads((cache / "meta.json").read_text())
    assert len(meta["shards"]) == 2
    assert meta["bytes"] == cache_bytes(meta["num_tokens"], HIDDEN, torch.float32)
    assert f"{meta['bytes'] / 1e9:.3f} GB" in stdout
    train_mtp(_cfg(tiny, tmp_path / "split", cache_hiddens=str(cache), **kw))
    train_mtp(_cfg(tiny, tmp_path / "straight", **kw))
    _close(_head(tmp_path / "split"), _head(tmp_path / "straight"))
    split, straight = _log(tmp_path / "split"), _log(tmp_path / "straight")
    assert [r["num_chains"] for r in split] == [r["num_chains"] for r in straight] == [6] * 4
