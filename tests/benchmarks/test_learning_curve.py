"""benchmarks/learning_curve.py on a tiny random Qwen3 target: nested training sets, the exact
count of response tokens trained on, and one snapshot row per (size, step, domain, T).

Run: python -m pytest -q tests/benchmarks/test_learning_curve.py   (~15 s)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bebop_spec.testing import make_tiny_model
from bebop_spec.train.data import DistillSample, read_dataset, write_dataset

REPO = Path(__file__).resolve().parents[2]
VOCAB, PROMPT = 32, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    spec = importlib.util.spec_from_file_location("learning_curve",
                                                  REPO / "benchmarks/learning_curve.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, two dataset dirs): 10 + 6 random sequences, responses of 8..17 tokens, two
    domains."""
    root = tmp_path_factory.mktemp("curve")
    model = make_tiny_model(root / "model", vocab_size=VOCAB, hidden_size=32, mtp_layout=None)
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for k, n in enumerate((10, 6)):
        samples = []
        for i in range(n):
            resp = 8 + (i * 7 + k) % 10
            ids = torch.randint(0, VOCAB, (PROMPT + resp,), generator=gen).tolist()
            samples.append(DistillSample(ids, [0] * PROMPT + [1] * resp, ("a", "b")[i % 2]))
        write_dataset(root / f"d{k}", samples, model=str(model), temperature=1.0)
        dirs.append(str(root / f"d{k}"))
    return model, dirs


def test_prefixes_are_nested_and_hold_the_asked_tokens(tiny):
    """The pool keeps every sequence once; prefix_for(n) is the shortest prefix with >= n
    response tokens, each prefix extends the smaller one, and 0 means the whole pool."""
    bench, (_, dirs) = _bench(), tiny
    pool = bench.pooled_order(dirs, seed=0)
    assert len(pool) == 16
    assert sorted(map(tuple, (s.input_ids for s in pool))) == sorted(
        tuple(read_dataset(d).sequence(i)[0].tolist())
        for d in dirs
        for i in range(len(read_dataset(d)))
    )
    small, big = bench.prefix_for(pool, 40), bench.prefix_for(pool, 100)
    resp = [sum(s.loss_mask) for s in pool]
    assert sum(resp[: len(small)]) >= 40 > sum(resp[: len(small) - 1])
    assert big[: len(small)] == small and len(big) > len(small)
    assert bench.prefix_for(pool, 0) == pool and bench.prefix_for(pool, 10**6) == pool


def test_run_scores_every_snapshot_and_counts_the_tokens_trained_on(tiny, tmp_path):
    """Two sizes, 4 steps, a snapshot every 2: rows for steps 2 and 4 per domain and T; every 2
    steps (4 sequences of 8..17 response tokens after a 4-token prompt, truncated to seq_len
    16) add between 4·8 and 4·12 response tokens seen; the JSON and plot are written."""
    bench, (model, dirs) = _bench(), tiny
    out = tmp_path / "curve.json"
    argv = ["--model", str(model), "--train-data", *dirs, "--heldout-data", dirs[1],
            "--sizes", "40", "0", "--steps", "4", "--eval-every", "2", "--loss", "tv",
            "--batch-size", "2", "--seq-len", "16", "--max-chains", "0", "--lr", "3e-3",
            "--temperatures", "1.0", "0.7", "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # sizes × steps × domains × temperatures
    for size in {r["size_tokens"] for r in rows}:
        seen = {r["step"]: r["tokens_seen"] for r in rows if r["size_tokens"] == size}
        assert 4 * 8 <= seen[2] <= 4 * 12 and 4 * 8 <= seen[4] - seen[2] <= 4 * 12
    assert all(0 <= r["accepted_length"] <= 3 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 1000
