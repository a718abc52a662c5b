"""Data-parallel head training under torchrun (train/distributed.py), 2 gloo ranks on CPU.

Invariants: W ranks taking their rows of each global batch, with losses weighted by their
chain counts and gradients summed, take the optimiser steps one process takes on the whole
batch — the heads agree to 1e-5 (float summation order differs) and the logged losses to
1e-5; a checkpoint written by one process resumes on two ranks and ends where one process
ends; only rank 0 writes (one log line per step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bebop_spec.server.testing import free_port
from bebop_spec.testing import make_tiny_model
from bebop_spec.train import trainer as trainer_mod
from bebop_spec.train.data import DistillSample, write_dataset
from bebop_spec.train.trainer import TrainConfig, train_mtp

VOCAB, STEPS = 32, 4
ARGS = dict(loss="e2e_tv", gamma=2, lr=3e-3, batch_size=4, seq_len=24, warmup=1,
            log_every=1, chunk_size=7, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target and 12 random sequences (4 prompt + 16 response tokens; lengths vary so
    the ranks hold different chain counts)."""
    root = tmp_path_factory.mktemp("ddp")
    model = make_tiny_model(root / "model", vocab_size=VOCAB, hidden_size=32, mtp_layout=None)
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


def _torchrun(tiny, out, **kw) -> None:
    cfg = ARGS | {"steps": STEPS, "save_every": 0} | kw
    flags = [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "bebop_spec.cli", "mtp", "train",
           "--model", str(tiny[0]), "--data", str(tiny[1]), "--out", str(out), "--resume",
           "--quiet", *flags]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _head(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "head.safetensors"))


def _close(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < tol, worst
    return worst


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train_mtp(_cfg(tiny, out))
    return out


def test_two_ranks_equal_one_process(tiny, one_process, tmp_path):
    """Same global batch, 2 ranks vs 1 process: heads within 1e-5, per-step logged losses and
    chain counts equal; the log has exactly one line per step (rank 1 wrote nothing)."""
    _torchrun(tiny, tmp_path / "two")
    _close(_head(tmp_path / "two"), _head(one_process))
    two = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (one_process / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["num_chains"] for r in two] == [r["num_chains"] for r in one]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two, one, strict=True)) < 1e-5
    assert (tmp_path / "two" / "head" / "config.json").is_file()


def test_checkpoint_resumes_at_another_world_size(tiny, one_process, tmp_path, monkeypatch):
    """One process checkpoints at step 2 and stops; 2 ranks resume it to step 4; the head
    equals 4 uninterrupted steps of one process (within 1e-5)."""
    real = trainer_mod._optimizer_step

    def stop_at_two(cfg, target, head, opt, batch, step, world=trainer_mod.World()):
        if step == 2:
            raise KeyboardInterrupt
        return real(cfg, target, head, opt, batch, step, world)

    monkeypatch.setattr(trainer_mod, "_optimizer_step", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        train_mtp(_cfg(tiny, tmp_path / "resumed", save_every=2))
    monkeypatch.undo()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    _torchrun(tiny, tmp_path / "resumed", save_every=2)
    _close(_head(tmp_path / "resumed"), _head(one_process))
