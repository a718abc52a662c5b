"""Decode and check incoming weights before anything is swapped.

Transport only: every path (disk, HTTP body, distributed group) decodes into fresh tensors
and then goes through the engine layer's one validator, `bebop_spec.engine.weights.
check_update`. Only safetensors is accepted from the network: never pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from bebop_client.bucket import nbytes

from bebop_spec.engine.weights import Spec
from bebop_spec.errors import ModelLoadError, WeightUpdateError
from bebop_spec.models.checkpoint import Checkpoint


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' -> torch.bfloat16 (the two spellings trainers send)."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r}")
    return dtype


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound


PICKLE_REFUSED = ("pickle is never accepted over the network (it runs code when loaded): "
                  "send safetensors (safetensors.torch.save) instead")  # fmt: skip


def pickle_kind(data: bytes | bytearray) -> str | None:
    """What pickle-based format `data` looks like, if any: SGLang's default
    serialized_named_tensors (ForkingPickler, protocol 2-5) or a torch.save zip archive."""
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return f"a pickle (protocol {data[1]})"
    if bytes(data[:4]) == b"PK\x03\x04":
        return "a torch.save zip archive (pickle inside)"
    return None


def load_safetensors_bytes(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """A safetensors file held in memory -> tensors (WeightUpdateError if malformed; the
    message says so when the bytes are pickle, which is never accepted).

    A bytearray is decoded without copying (tensors are views of it); the format is
    8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data. Everything in
    the header is checked against the buffer before any tensor is made."""
    try:
        return _load_safetensors(data if isinstance(data, bytearray) else bytearray(data))
    except WeightUpdateError as exc:
        kind = pickle_kind(data)
        if kind is not None:  # checked only on failure: a safetensors header may start so too
            raise WeightUpdateError(f"the body is {kind}; {PICKLE_REFUSED}") from exc
        raise


def _load_safetensors(buf: bytearray) -> dict[str, torch.Tensor]:
    if len(buf) < 8:
        raise WeightUpdateError("not a safetensors file (shorter than its 8-byte header)")
    n = int.from_bytes(buf[:8], "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, len(buf) - 8):
        raise WeightUpdateError(f"malformed safetensors data: header length {n} does not fit")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightUpdateError(f"malformed safetensors data: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightUpdateError("malformed safetensors data: header is not a JSON object")
    header.pop("__metadata__", None)
    start, size = 8 + n, len(buf) - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        dtype, shape, (b, e) = _entry(name, info, size)
        spans.append((b, e, name))
        out[name] = _view(buf, start + b, start + e, dtype).reshape(shape)
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise WeightUpdateError(f"malformed safetensors data: {n1} and {n2} overlap")
    return out


def _view(buf: bytearray, b: int, e: int, dtype: torch.dtype) -> torch.Tensor:
    """buf[b:e] as a flat tensor: a view when aligned, else (never from safetensors) a copy."""
    if e == b:
        return torch.empty(0, dtype=dtype)
    if b % dtype.itemsize:
        return torch.frombuffer(bytearray(buf[b:e]), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=(e - b) // dtype.itemsize, offset=b)


def _nonneg_ints(xs: object, length: int | None = None) -> bool:
    ok = isinstance(xs, list) and (length is None or len(xs) == length)
    return ok and all(type(x) is int and x >= 0 for x in xs)  # type: ignore[union-attr]


def _entry(
    name: str, info: object, size: int
) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """One header entry -> (dtype, shape, (begin, end)), all checked against `size` bytes."""
    bad = f"malformed safetensors data: entry {name!r}"
    if not isinstance(info, dict):
        raise WeightUpdateError(bad)
    name_of_dtype = info.get("dtype")
    dtype = _ST_DTYPES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None:
        raise WeightUpdateError(f"{bad}: unsupported dtype {info.get('dtype')!r}")
    if not _nonneg_ints(shape) or not _nonneg_ints(offsets, 2):
        raise WeightUpdateError(f"{bad}: shape / data_offsets must be non-negative integers")
    b, e = offsets
    if not b <= e <= size or e - b != nbytes(shape, dtype):
        raise WeightUpdateError(
            f"{bad}: data_offsets {offsets} do not match shape {shape} in {size} bytes"
        )
    return dtype, tuple(shape), (b, e)


def load_safetensors_dir(
    path: str | os.PathLike, root: str | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (`*.safetensors`, sharded or not)."""
    try:  # "~nosuchuser/x" raises RuntimeError, a NUL byte ValueError: both are client input
        p = Path(path).expanduser()
        real = p.resolve()
        is_file, is_dir = p.is_file(), p.is_dir()
    except (RuntimeError, ValueError, OSError) as exc:
        raise WeightUpdateError(f"model_path {str(path)!r} is not a usable path: {exc}") from exc
    if root is not None:
        base = Path(root).expanduser().resolve()
        if base != real and base not in real.parents:
            raise WeightUpdateError(f"model_path must lie under {base}")
    if not (is_file and p.suffix == ".safetensors") and not is_dir:
        raise WeightUpdateError(f"model_path {str(path)!r} is not a directory of safetensors files")
    try:
        return Checkpoint(p).read()
    except ModelLoadError as exc:
        raise WeightUpdateError(str(exc)) from exc


def select_known(
    tensors: Mapping[str, torch.Tensor], spec: Spec, aliases: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """For checkpoints read from disk: keep the tensors `spec` (or `aliases`) names (the
    selector's part of the model); return them and how many were skipped."""
    kept = {k: v for k, v in tensors.items() if k in spec or k in (aliases or {})}
    if not kept:
        raise WeightUpdateError(
            f"none of the {len(tensors)} tensors matches a parameter of the selected weights "
            f"(e.g. {next(iter(tensors), '-')!r} vs {next(iter(spec), '-')!r})"
        )
    return kept, len(tensors) - len(kept)
