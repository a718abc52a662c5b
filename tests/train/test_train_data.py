"""Self-distillation dataset on disk (bebop_spec.train.data): round trip, validation, batches.

Run: python -m pytest -q tests/train/test_train_data.py
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bebop_spec.train.data import (
    DistillSample,
    complete_chain_starts,
    iterate_batches,
    read_dataset,
    write_dataset,
)

SAMPLES = [
    DistillSample([1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 1, 1, 1], "math"),
    DistillSample([8, 9, 10], [0, 1, 1], "code"),
    DistillSample([11, 12, 13, 14, 15, 16], [0, 1, 1, 1, 1, 1], "math"),
]


@pytest.fixture
def ds_dir(tmp_path):
    write_dataset(tmp_path / "ds", SAMPLES, model="tiny", temperature=1.0, extra={"k": 1})
    return tmp_path / "ds"


def test_round_trip_keeps_sequences_domains_and_counts(ds_dir):
    """Written samples read back identically; meta counts match the data."""
    ds = read_dataset(ds_dir)
    assert len(ds) == 3 and ds.meta.domains == ["math", "code"]
    assert ds.meta.num_tokens == 16 and ds.meta.num_response_tokens == 12
    assert ds.domain.tolist() == [0, 1, 0] and ds.meta.extra == {"k": 1}
    for i, s in enumerate(SAMPLES):
        ids, mask = ds.sequence(i)
        assert ids.tolist() == s.input_ids and mask.long().tolist() == s.loss_mask


def _rewrite(ds_dir, **changes):
    tensors = load_file(str(ds_dir / "data.safetensors"))
    tensors.update(changes)
    save_file(tensors, str(ds_dir / "data.safetensors"))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "data.safetensors").write_bytes(b"\x00garbage"), "corrupt"),
        (lambda d: (d / "meta.json").unlink(), "missing meta.json"),
        (lambda d: (d / "meta.json").write_text("{"), "not valid JSON"),
        (lambda d: _rewrite(d, loss_mask=torch.zeros(15, dtype=torch.uint8)), "loss_mask 15"),
        (lambda d: _rewrite(d, offsets=torch.tensor([0, 7, 5, 16])), "offsets"),
        (lambda d: _rewrite(d, domain=torch.zeros(2, dtype=torch.int32)), "domain has 2"),
        (lambda d: _rewrite(d, input_ids=torch.zeros(16, dtype=torch.int64)), "int32"),
        (lambda d: _rewrite(d, domain=torch.tensor([0, 5, 0], dtype=torch.int32)), "out of range"),
        (
            lambda d: (d / "meta.json").write_text(
                json.dumps({**json.loads((d / "meta.json").read_text()), "num_tokens": 3})
            ),
            "num_tokens=3",
        ),
    ],
)
def test_bad_datasets_raise_value_errors_naming_the_problem(ds_dir, damage, message):
    """Corrupt files, missing files and inconsistent tensors are ValueErrors that say what."""
    damage(ds_dir)
    with pytest.raises(ValueError, match=message):
        read_dataset(ds_dir)


def test_empty_dataset_is_rejected(tmp_path):
    """Nothing to write, or a file with zero sequences, is a ValueError."""
    with pytest.raises(ValueError, match="no samples"):
        write_dataset(tmp_path / "e", [], model="m", temperature=1.0)
    with pytest.raises(ValueError, match="not a directory"):
        read_dataset(tmp_path / "nowhere")


def test_complete_chain_starts_by_hand():
    """Start t counts iff its γ targets x_{t+2}..x_{t+γ+1} exist and are in the loss mask.
    mask = 0 0 1 1 1 1 1 (T=7), γ=2: targets of t are t+2, t+3 -> t = 0, 1, 2, 3."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    got = complete_chain_starts(mask, 2)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert got[1].nonzero().flatten().tolist() == [2]  # targets (4, 5); t=0 hits 3, t=3 hits 6
    assert not complete_chain_starts(mask[:, :3], 2).any()  # T = γ + 1: no room


def test_batches_are_padded_filtered_and_replayable(ds_dir):
    """Rows are right-padded with 0 / mask False; sequences without a complete chain are
    skipped; resuming at start_step reproduces the same batches."""
    ds = read_dataset(ds_dir)
    batches = iterate_batches(ds, batch_size=2, seq_len=6, seed=3, gamma=3)
    first = [next(batches) for _ in range(4)]
    for b in first:
        assert b.input_ids.shape == (2, 6)
        assert 8 not in b.input_ids.flatten().tolist()  # "code" has no γ=3 chain: filtered
        for row, n in zip(b.loss_mask, b.lengths, strict=True):
            assert not row[n:].any()
    resumed = iterate_batches(ds, batch_size=2, seq_len=6, seed=3, gamma=3, start_step=2)
    for want in first[2:]:
        assert torch.equal(next(resumed).input_ids, want.input_ids)
    with pytest.raises(ValueError, match="no sequence has a complete"):
        next(iterate_batches(ds, batch_size=2, seq_len=6, seed=0, gamma=5))
