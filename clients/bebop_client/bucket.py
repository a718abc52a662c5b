"""The flattened weight bucket on the wire: the one home of its byte layout.

`load_format: "flattened_bucket"` (SGLang's `FlattenedTensorBucket`) sends a bucket as one
uint8 buffer: each tensor's bytes back to back in `names` order, no padding and no header
(the names, dtypes and shapes travel in the JSON announcement). A tensor's offset must be a
multiple of its element size, so the trainer sends one dtype per bucket
(bebop_client.tensors.by_dtype). The trainer packs with `flatten_bucket`; the server
(bebop_spec.server.weight_sync.group) unpacks with `unflatten_bucket`. torch is imported
only by `flatten_bucket`, when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of `shape` and `dtype` (its span in a bucket)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel * dtype.itemsize


def flatten_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors (contiguous, one device) -> one uint8 buffer[Σ nbytes] of their bytes in order."""
    import torch

    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])


def unflatten_bucket(
    buffer: torch.Tensor,
    names: Sequence[str],
    dtypes: Sequence[torch.dtype],
    shapes: Sequence[Sequence[int]],
) -> dict[str, torch.Tensor]:
    """uint8 buffer[Σ nbytes] -> {name: view of its bytes as dtype, shape}, in `names` order.

    ValueError when the buffer's size is not the tensors' or an offset is unaligned."""
    need = sum(nbytes(s, d) for s, d in zip(shapes, dtypes, strict=True))
    if need != buffer.numel():
        raise ValueError(f"bucket holds {buffer.numel()} bytes, tensors need {need}")
    out, offset = {}, 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        size = nbytes(shape, dtype)
        if offset % dtype.itemsize:
            raise ValueError(f"unaligned tensor {name} at byte {offset} for {dtype}")
        out[name] = buffer[offset : offset + size].view(dtype).reshape(tuple(shape))
        offset += size
    return out
