"""Slot-indexed KV cache with a scratch column for padding (contract: docs/architecture.md).

    cache = KVCache(num_layers, num_slots, max_len, n_kv_heads, head_dim, torch.float32, "cpu")
    view = cache.view(slots, positions)   # once per forward, shared by every layer
    view.write(layer, k, v); k_all, v_all = view.read(layer)

A sequence owns one slot (row). Position `p` of that sequence lives in column `p`; column
`max_len` (`cache.scratch`) takes the writes of padded tokens and is never attended.
Rollback needs no bookkeeping here: the next forward overwrites positions before attending,
and a query at position P only sees columns 0..P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Preallocated `k, v: [num_layers, num_slots, n_kv_heads, max_len + 1, head_dim]`.

    Heads before positions, so a batch's keys read as `[B, kv, len, d]` — the layout attention
    multiplies — without a transpose copy.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_slots", num_slots),
                            ("max_len", max_len), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim)):  # fmt: skip
            if value <= 0:
                raise ValueError(f"KVCache {name}={value} must be positive")
        shape = (num_layers, num_slots, n_kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def scratch(self) -> int:
        """Column index padded tokens write to (`positions == scratch` marks padding)."""
        return self.max_len

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def view(self, slots: torch.Tensor, positions: torch.Tensor) -> CacheView:
        """Plan one forward: slots[B] (long), positions[B,T] (long, `scratch` = padding)."""
        if slots.dim() != 1 or positions.dim() != 2 or slots.shape[0] != positions.shape[0]:
            raise ValueError(
                f"slots must be [B] and positions [B,T]; got {tuple(slots.shape)} and "
                f"{tuple(positions.shape)}"
            )
        device = self.k.device
        slots = slots.to(device=device, dtype=torch.long)
        positions = positions.to(device=device, dtype=torch.long)
        if positions.numel() == 0:
            raise ValueError("positions is empty")
        # Keys are gathered up to the furthest real position in the batch, never the scratch.
        furthest = positions.masked_fill(positions == self.scratch, -1).max()
        steps = slots[1:] - slots[:-1]
        in_order = (steps == 1).all() if steps.numel() else torch.ones((), dtype=torch.bool)
        stats = torch.stack([positions.min(), positions.max(), furthest, slots.min(), slots.max(),
                             in_order.to(torch.long, copy=True)])  # fmt: skip
        lo, hi, last, slot_lo, slot_hi, in_order = stats.tolist()  # one host sync
        if lo < 0 or hi > self.scratch:
            raise ValueError(f"positions must lie in [0, {self.max_len}] (scratch={self.scratch})")
        if slot_lo < 0 or slot_hi >= self.num_slots:
            raise ValueError(f"slots must lie in [0, {self.num_slots})")
        kv_len = max(last + 1, 1)
        mask = visible_keys(positions, kv_len, one_column=lo == hi == last)
        first = slot_lo if in_order else None  # consecutive slots: read a view, not a gather
        return CacheView(self, slots, positions, kv_len, mask, first)


def visible_keys(positions: torch.Tensor, kv_len: int, one_column: bool) -> torch.Tensor | None:
    """mask[B, 1, T, kv_len]: key j visible to query (b, t) iff j <= positions[b, t]; None
    (every key visible) for one token per row, all at the last key (`one_column`). Padded
    queries (position = scratch > every key) see every key, which keeps SDPA free of
    all-masked rows."""
    if positions.shape[1] == 1 and one_column:
        return None
    key_pos = torch.arange(kv_len, device=positions.device)
    return (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)


@dataclass
class CacheView:
    """One forward's addressing into a KVCache: where to write, what to read, the mask."""

    cache: KVCache
    slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [B, T]
    kv_len: int  # columns 0..kv_len-1 are read
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool, True = attend; None = attend all
    first_slot: int | None = None  # slots are first_slot, first_slot+1, ...: read by slicing

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v[B,T,kv,d] at cache[layer, slots[b], :, positions[b,t]]."""
        rows = self.slots[:, None].expand_as(self.positions)
        # Indices split by a slice: the indexed dims [B, T] come first, then kv, d — k's shape.
        self.cache.k[layer][rows, :, self.positions] = k.to(self.cache.k.dtype)
        self.cache.v[layer][rows, :, self.positions] = v.to(self.cache.v.dtype)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v[B, kv, kv_len, d] of this batch's slots: a view when the slots are consecutive,
        else a gathered copy."""
        k = self.cache.k[layer, :, :, : self.kv_len]
        v = self.cache.v[layer, :, :, : self.kv_len]
        if self.first_slot is not None:
            n = self.slots.shape[0]
            return k.narrow(0, self.first_slot, n), v.narrow(0, self.first_slot, n)
        return k.index_select(0, self.slots), v.index_select(0, self.slots)
