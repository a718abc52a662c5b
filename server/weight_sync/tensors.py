"""Decode and check incoming weights before anything is swapped.

Every path (disk, HTTP body, distributed group) ends in `check_update`, which checks ALL
tensors (known name, exact shape, floating dtype, finite values) and casts float dtypes to
the serving dtype; any problem rejects the whole update (WeightUpdateError). Only
safetensors is accepted from the network: never pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch

from bebop_spec.errors import WeightUpdateError

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
MAX_REPORTED = 8


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' -> torch.bfloat16 (the two spellings trainers send)."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r}")
    return dtype


def load_safetensors_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """A safetensors file held in memory -> tensors (WeightUpdateError if malformed)."""
    if len(data) < 8:
        raise WeightUpdateError("body is not a safetensors file (shorter than its 8-byte header)")
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as exc:  # the rust decoder raises SafetensorError / others
        raise WeightUpdateError(f"malformed safetensors data: {exc}") from exc


def load_safetensors_dir(
    path: str | os.PathLike, root: str | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (`*.safetensors`, sharded or not)."""
    p = Path(path).expanduser()
    if root is not None:
        real, base = p.resolve(), Path(root).expanduser().resolve()
        if base != real and base not in real.parents:
            raise WeightUpdateError(f"model_path must lie under {base}")
    if p.is_file() and p.suffix == ".safetensors":
        files = [p]
    elif p.is_dir():
        files = _checkpoint_files(p)
    else:
        raise WeightUpdateError(f"model_path {str(path)!r} is not a directory of safetensors files")
    if not files:
        raise WeightUpdateError(f"no *.safetensors files in {str(path)!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(safetensors.torch.load_file(str(f)))
        except Exception as exc:
            raise WeightUpdateError(f"cannot read {f.name}: {exc}") from exc
    return tensors


def _checkpoint_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightUpdateError(f"malformed {index.name}: {exc}") from exc
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise WeightUpdateError(f"{index.name} names missing shards: {missing[:3]}")
        return [d / s for s in shards]
    return sorted(d.glob("*.safetensors"))


def unflatten_bucket(
    buffer: torch.Tensor,
    names: Sequence[str],
    dtypes: Sequence[torch.dtype],
    shapes: Sequence[Sequence[int]],
) -> dict[str, torch.Tensor]:
    """One uint8 buffer holding tensors back to back in `names` order -> views (SGLang's
    `FlattenedTensorBucket` layout: no padding, each offset aligned to its dtype)."""
    need = sum(nbytes(s, d) for s, d in zip(shapes, dtypes, strict=True))
    if need != buffer.numel():
        raise WeightUpdateError(f"bucket holds {buffer.numel()} bytes, tensors need {need}")
    out, offset = {}, 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        size = nbytes(shape, dtype)
        if offset % dtype.itemsize:
            raise WeightUpdateError(f"unaligned tensor {name} at byte {offset} for {dtype}")
        out[name] = buffer[offset : offset + size].view(dtype).reshape(tuple(shape))
        offset += size
    return out


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel * dtype.itemsize


def check_update(tensors: Mapping[str, torch.Tensor], spec: Spec) -> dict[str, torch.Tensor]:
    """Validate every tensor against `spec` (name -> (shape, dtype)) and cast float dtypes
    to the serving dtype. Raises WeightUpdateError listing the problems; returns the
    tensors ready to swap in."""
    if not tensors:
        raise WeightUpdateError("the update holds no tensors")
    problems: list[str] = []
    ready: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name not in spec:
            problems.append(f"unknown parameter {name!r}")
            continue
        shape, dtype = spec[name]
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(t.shape)} != expected {tuple(shape)}")
            continue
        if t.dtype != dtype and not (t.dtype.is_floating_point and dtype.is_floating_point):
            problems.append(f"{name}: dtype {t.dtype} cannot replace {dtype}")
            continue
        t = t.to(dtype) if t.dtype != dtype else t
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: holds non-finite values")
            continue
        ready[name] = t
    if problems:
        more = f" (+{len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise WeightUpdateError("; ".join(problems[:MAX_REPORTED]) + more)
    return ready


def select_known(
    tensors: Mapping[str, torch.Tensor], spec: Spec
) -> tuple[dict[str, torch.Tensor], int]:
    """For checkpoints read from disk: keep the tensors `spec` names (the selector's part of
    the model); return them and how many were skipped."""
    kept = {k: v for k, v in tensors.items() if k in spec}
    if not kept:
        raise WeightUpdateError(
            f"none of the {len(tensors)} tensors matches a parameter of the selected weights "
            f"(e.g. {next(iter(tensors), '-')!r} vs {next(iter(spec), '-')!r})"
        )
    return kept, len(tensors) - len(kept)
