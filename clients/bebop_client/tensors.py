"""State dicts (name -> torch tensor or numpy array) -> safetensors, buckets, dtype names.

torch is imported only when a value is a torch tensor: numpy-only trainers never need it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

StateDict = Mapping[str, Any]


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def nbytes(x: Any) -> int:
    return int(x.numel() * x.element_size()) if is_torch(x) else int(np.asarray(x).nbytes)


def shape_of(x: Any) -> list[int]:
    return [int(d) for d in x.shape]


def dtype_name(x: Any) -> str:
    """ "bfloat16", "float32", ... (the spelling SGLang's /update_weights_from_distributed takes)."""
    if is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name


def check_state_dict(tensors: StateDict) -> None:
    if not tensors:
        raise ValueError("the state dict is empty")
    for name, x in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not (is_torch(x) or isinstance(x, np.ndarray)):
            raise TypeError(
                f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}"
            )


def _for_safetensors(tensors: StateDict) -> tuple[str, dict[str, Any]]:
    """("torch" | "numpy", contiguous CPU copies) for safetensors' save functions."""
    if any(is_torch(x) for x in tensors.values()):
        import torch

        return "torch", {k: (x.detach().cpu() if is_torch(x) else torch.from_numpy(np.asarray(x)))
                         .contiguous() for k, x in tensors.items()}  # fmt: skip
    return "numpy", {k: np.ascontiguousarray(x) for k, x in tensors.items()}


def to_safetensors_bytes(tensors: StateDict) -> bytes:
    kind, data = _for_safetensors(tensors)
    if kind == "torch":
        import safetensors.torch

        return safetensors.torch.save(data)
    import safetensors.numpy

    return safetensors.numpy.save(data)


def save_checkpoint(tensors: StateDict, out_dir: str | os.PathLike, shard_bytes: int) -> Path:
    """Write `out_dir/model.safetensors`, or shards plus `model.safetensors.index.json`
    when the tensors exceed `shard_bytes`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = list(buckets(tensors, shard_bytes))
    if len(shards) == 1:
        (out / "model.safetensors").write_bytes(to_safetensors_bytes(shards[0]))
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / fname).write_bytes(to_safetensors_bytes(shard))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(nbytes(x) for x in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


def buckets(tensors: StateDict, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor travels alone), in order."""
    if max_bytes < 1:
        raise ValueError("bucket size must be >= 1 byte")
    bucket: dict[str, Any] = {}
    size = 0
    for name, x in tensors.items():
        n = nbytes(x)
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = x
        size += n
    if bucket:
        yield bucket


def by_dtype(tensors: StateDict) -> list[dict[str, Any]]:
    """Split into one dict per dtype (first-seen order): a flattened bucket holds one dtype,
    so every tensor's offset is aligned to its element size."""
    groups: dict[str, dict[str, Any]] = {}
    for name, x in tensors.items():
        groups.setdefault(dtype_name(x), {})[name] = x
    return list(groups.values())
