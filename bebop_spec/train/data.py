"""Self-distillation dataset for MTP training: target-generated responses on disk.

Layout of a dataset directory:
    data.safetensors   input_ids int32 [total]   all sequences back to back
                       loss_mask uint8 [total]   1 on response (target-sampled) tokens
                       offsets   int64 [S + 1]   sequence i is input_ids[offsets[i]:offsets[i+1]]
                       domain    int32 [S]       index into meta.json "domains"
    meta.json          domains, model, temperature, num_sequences, num_tokens,
                       num_response_tokens, extra

    write_dataset(out_dir, samples, model=..., temperature=...)
    ds = read_dataset(out_dir)
    for batch in iterate_batches(ds, batch_size=8, seq_len=1024, seed=0): ...
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

DATA_FILE, META_FILE = "data.safetensors", "meta.json"


@dataclass
class DistillSample:
    """One prompt + target-sampled response; loss_mask is 1 on response tokens."""

    input_ids: list[int]
    loss_mask: list[int]
    domain: str = "default"


@dataclass
class DatasetMeta:
    domains: list[str]
    model: str
    temperature: float
    num_sequences: int
    num_tokens: int
    num_response_tokens: int
    extra: dict = field(default_factory=dict)


@dataclass
class DistillDataset:
    input_ids: Tensor  # int32 [total]
    loss_mask: Tensor  # uint8 [total]
    offsets: Tensor  # int64 [S + 1]
    domain: Tensor  # int32 [S]
    meta: DatasetMeta

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def sequence(self, i: int) -> tuple[Tensor, Tensor]:
        """(input_ids [L] int64, loss_mask [L] bool) of sequence i."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[lo:hi].long(), self.loss_mask[lo:hi].bool()


@dataclass
class Batch:
    input_ids: Tensor  # int64 [B, T], right-padded with 0
    loss_mask: Tensor  # bool [B, T], False on prompt and padding
    lengths: Tensor  # int64 [B], real tokens per row (after truncation to seq_len)
    index: Tensor | None = None  # int64 [B], the dataset sequence of each row (iterate_batches)


def write_dataset(
    out_dir: str | Path,
    samples: Iterable[DistillSample],
    *,
    model: str,
    temperature: float,
    extra: dict | None = None,
) -> DatasetMeta:
    """Write samples to out_dir (created) as data.safetensors + meta.json; returns the meta."""
    ids: list[int] = []
    mask: list[int] = []
    offsets, domain_ids, domains = [0], [], {}
    for s in samples:
        if len(s.input_ids) != len(s.loss_mask) or not s.input_ids:
            raise ValueError(
                f"sample {len(offsets) - 1}: input_ids ({len(s.input_ids)}) and loss_mask "
                f"({len(s.loss_mask)}) must be non-empty and of equal length"
            )
        ids.extend(s.input_ids)
        mask.extend(1 if m else 0 for m in s.loss_mask)
        offsets.append(len(ids))
        domain_ids.append(domains.setdefault(s.domain, len(domains)))
    if not domain_ids:
        raise ValueError("write_dataset: no samples to write")
    meta = DatasetMeta(
        domains=list(domains),
        model=str(model),
        temperature=float(temperature),
        num_sequences=len(domain_ids),
        num_tokens=len(ids),
        num_response_tokens=sum(mask),
        extra=dict(extra or {}),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "input_ids": torch.tensor(ids, dtype=torch.int32),
        "loss_mask": torch.tensor(mask, dtype=torch.uint8),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "domain": torch.tensor(domain_ids, dtype=torch.int32),
    }
    save_file(tensors, str(out / DATA_FILE))
    (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


_DTYPES = {
    "input_ids": torch.int32,
    "loss_mask": torch.uint8,
    "offsets": torch.int64,
    "domain": torch.int32,
}


def _load_files(path: Path) -> tuple[dict[str, Tensor], dict]:
    for name in (DATA_FILE, META_FILE):
        if not (path / name).is_file():
            raise ValueError(f"dataset {path}: missing {name}")
    try:
        tensors = load_file(str(path / DATA_FILE))
    except Exception as e:  # safetensors raises several types on truncated / garbage files
        raise ValueError(f"dataset {path}: {DATA_FILE} is corrupt ({e})") from e
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset {path}: {META_FILE} is not valid JSON ({e})") from e
    return tensors, meta


def _check_tensors(path: Path, t: dict[str, Tensor]) -> None:
    for key, dtype in _DTYPES.items():
        if key not in t:
            raise ValueError(f"dataset {path}: {DATA_FILE} has no tensor {key!r}")
        if t[key].dtype != dtype or t[key].dim() != 1:
            raise ValueError(
                f"dataset {path}: {key} must be 1-D {dtype}, got "
                f"{t[key].dtype} {list(t[key].shape)}"
            )
    ids, mask, offsets, domain = (t[k] for k in _DTYPES)
    if offsets.numel() < 2:
        raise ValueError(f"dataset {path}: empty (no sequences)")
    if ids.numel() != mask.numel():
        raise ValueError(
            f"dataset {path}: input_ids has {ids.numel()} tokens but loss_mask {mask.numel()}"
        )
    if offsets[0] != 0 or offsets[-1] != ids.numel() or (offsets.diff() <= 0).any():
        raise ValueError(
            f"dataset {path}: offsets must rise strictly from 0 to {ids.numel()} (the token count)"
        )
    if domain.numel() != offsets.numel() - 1:
        raise ValueError(
            f"dataset {path}: domain has {domain.numel()} entries for {offsets.numel() - 1} sequences"
        )
    if (ids < 0).any() or (mask > 1).any():
        raise ValueError(f"dataset {path}: negative token ids or loss_mask values other than 0/1")


def _check_meta(path: Path, meta: dict, t: dict[str, Tensor]) -> DatasetMeta:
    try:
        m = DatasetMeta(**meta)
    except TypeError as e:
        raise ValueError(f"dataset {path}: {META_FILE} has wrong fields ({e})") from e
    counts = {
        "num_sequences": t["offsets"].numel() - 1,
        "num_tokens": t["input_ids"].numel(),
        "num_response_tokens": int(t["loss_mask"].sum()),
    }
    for key, actual in counts.items():
        if getattr(m, key) != actual:
            raise ValueError(f"dataset {path}: meta {key}={getattr(m, key)} but data has {actual}")
    if t["domain"].numel() and not (
        0 <= int(t["domain"].min()) <= int(t["domain"].max()) < len(m.domains)
    ):
        raise ValueError(f"dataset {path}: domain ids out of range of {len(m.domains)} domains")
    return m


def read_dataset(path: str | Path) -> DistillDataset:
    """Load and validate a dataset directory; ValueError naming the problem if it is bad."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"dataset {path}: not a directory")
    tensors, meta = _load_files(path)
    _check_tensors(path, tensors)
    m = _check_meta(path, meta, tensors)
    return DistillDataset(
        tensors["input_ids"], tensors["loss_mask"], tensors["offsets"], tensors["domain"], m
    )


def complete_chain_starts(loss_mask: Tensor, gamma: int) -> Tensor:
    """loss_mask[..., T] bool -> [..., T] bool: start t counts iff x_{t+2} .. x_{t+γ+1} (the
    γ tokens its chain predicts) all lie inside the row and inside the loss mask."""
    t = loss_mask.shape[-1]
    out = torch.zeros_like(loss_mask, dtype=torch.bool)
    n = t - gamma - 1  # starts 0 .. T-γ-2 have all targets inside the row
    if n <= 0:
        return out
    ok = torch.ones_like(loss_mask[..., :n], dtype=torch.bool)
    for k in range(1, gamma + 1):
        ok &= loss_mask[..., k + 1 : k + 1 + n].bool()
    out[..., :n] = ok
    return out


def iterate_batches(
    ds: DistillDataset,
    batch_size: int,
    seq_len: int,
    seed: int,
    gamma: int = 1,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Endless shuffled batches of sequences truncated to seq_len (prompt first, so the tail of
    long responses is dropped). Only sequences holding at least one complete γ-chain are used.
    Batch s depends only on (seed, s), so resuming at start_step replays the same stream."""
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    usable = [
        i for i in range(len(ds)) if complete_chain_starts(ds.sequence(i)[1][:seq_len], gamma).any()
    ]
    if not usable:
        raise ValueError(
            f"no sequence has a complete γ={gamma} chain inside its loss mask within "
            f"seq_len={seq_len}"
        )
    per_epoch = max(1, len(usable) // batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed + epoch))
        rows = [usable[int(i)] for i in order[k * batch_size : (k + 1) * batch_size]]
        if len(rows) < batch_size:  # fewer sequences than batch_size: wrap around
            rows = (rows * batch_size)[:batch_size]
        batch = collate([ds.sequence(i) for i in rows], seq_len)
        batch.index = torch.tensor(rows, dtype=torch.int64)
        yield batch
        step += 1


def collate(seqs: list[tuple[Tensor, Tensor]], seq_len: int) -> Batch:
    """[(ids[L], mask[L])] -> right-padded Batch with T = min(seq_len, longest)."""
    lengths = torch.tensor([min(len(ids), seq_len) for ids, _ in seqs], dtype=torch.int64)
    t = int(lengths.max())
    ids = torch.zeros(len(seqs), t, dtype=torch.int64)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for b, (x, m) in enumerate(seqs):
        n = int(lengths[b])
        ids[b, :n], mask[b, :n] = x[:n], m[:n]
    return Batch(ids, mask, lengths)
