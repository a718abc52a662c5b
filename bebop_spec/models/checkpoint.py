"""Safetensors checkpoints: the one place that knows a checkpoint's files, names and shapes.

A directory holds the shards its `model.safetensors.index.json` lists or, without an index,
every `*.safetensors` file in it; a path may also name one `.safetensors` file. Only headers
are read until tensors are asked for. The loader, the server's update-from-disk and the remote
backends' weight specs all read checkpoints through `Checkpoint`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from bebop_spec.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint path (see the module docstring)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory of safetensors files")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"malformed {index}: {exc}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shard(s) that do not exist: {missing[:3]}")
        return [path / s for s in shards]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"no safetensors weights in {path}")
    return found


class Checkpoint:
    """Tensor names, shapes, dtypes and files of a checkpoint (single file or sharded)."""

    def __init__(self, path: str | Path) -> None:
        self.directory = Path(path) if Path(path).is_dir() else Path(path).parent
        self.files = checkpoint_files(path)
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for file in self.files:  # headers only; no tensor data is read here
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        meta = f.get_slice(name)
                        self.location[name] = file
                        self.shapes[name] = tuple(meta.get_shape())
                        self.dtypes[name] = DTYPES[meta.get_dtype()]
            except Exception as exc:  # a truncated or foreign file
                raise ModelLoadError(f"cannot read {file.name}: {exc}") from None

    def names(self) -> set[str]:
        return set(self.location)

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)}, from the headers."""
        return {n: (self.shapes[n], self.dtypes[n]) for n in self.location}

    def read(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (None: all of them), each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in self.location if names is None else names:
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            try:
                with safe_open(file, framework="pt") as f:
                    for name in group:
                        out[name] = f.get_tensor(name)
            except Exception as exc:
                raise ModelLoadError(f"cannot read {file.name}: {exc}") from None
        return out


def is_mtp_name(name: str, num_hidden_layers: int) -> bool:
    """True for tensors of an MTP head in either layout (`mtp.*`, `model.layers.{>=N}.*`)."""
    if name.startswith("mtp."):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= num_hidden_layers
