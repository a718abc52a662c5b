"""Paged KV cache: fixed-size blocks of token slots addressed through per-row block tables.

    cache = PagedKVCache(num_layers, num_blocks, block_size, n_kv_heads, head_dim, max_len)
    view = cache.view(block_tables, positions)   # block_tables[B, nb] (long), positions[B, T]
    view.write(layer, k, v); k_all, v_all = view.read(layer)

Position `p` of row `b` lives in slot `block_tables[b, p // block_size] * block_size +
p % block_size`. The engine's block manager (engine/block_manager.py) owns which blocks a
sequence holds; several rows may share a block (a common prompt prefix) as long as none of
them writes it. `positions == max_len` (`cache.scratch`) marks padding, written to a reserved
scratch block that is never read. Within one forward every layer writes all rows before any
row reads, so a row may attend to a block another row of the same batch fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bebop_spec.models.kv_cache import visible_keys


class PagedKVCache:
    """`k, v: [num_layers, (num_blocks + 1) * block_size, n_kv_heads, head_dim]`, token-major
    so that a forward's writes are one `index_copy_` of its `[B·T, kv, d]` keys."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("max_len", max_len)):  # fmt: skip
            if value <= 0:
                raise ValueError(f"PagedKVCache {name}={value} must be positive")
        self.shape = (num_layers, (num_blocks + 1) * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(self.shape, dtype=dtype, device=device)
        self.v = torch.zeros(self.shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_len = max_len

    @property
    def released(self) -> bool:
        return self.k.numel() == 0 and self.shape[0] > 0

    def release(self) -> None:
        """Free the pool's memory (SGLang's release_memory_occupation); nothing it held
        survives. `restore()` allocates it again, zero-filled."""
        self.k = self.k.new_empty(0)
        self.v = self.v.new_empty(0)

    def restore(self) -> None:
        if self.released:
            self.k = torch.zeros(self.shape, dtype=self.k.dtype, device=self.k.device)
            self.v = torch.zeros_like(self.k)

    @property
    def scratch(self) -> int:
        """Position value that marks a padded token (its K/V go to the scratch block)."""
        return self.max_len

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_width: int,
                        dtype: torch.dtype) -> int:  # fmt: skip
        """K and V of one block over `num_layers` layers (kv_width = n_kv_heads · head_dim)."""
        return 2 * num_layers * block_size * kv_width * dtype.itemsize

    def view(self, block_tables: torch.Tensor, positions: torch.Tensor) -> PagedView:
        """Plan one forward: block_tables[B, nb] (long), positions[B, T] (`scratch` = padding)."""
        if (
            block_tables.dim() != 2
            or positions.dim() != 2
            or (block_tables.shape[0] != positions.shape[0])
        ):
            raise ValueError(
                f"block_tables must be [B, nb] and positions [B, T]; got "
                f"{tuple(block_tables.shape)} and {tuple(positions.shape)}"
            )
        if positions.numel() == 0:
            raise ValueError("positions is empty")
        device, bs = self.k.device, self.block_size
        tables = block_tables.to(device=device, dtype=torch.long)
        positions = positions.to(device=device, dtype=torch.long)
        pad = positions == self.scratch
        furthest = positions.masked_fill(pad, -1).max()
        stats = torch.stack([positions.min(), positions.max(), furthest, tables.min(),
                             tables.max()])  # fmt: skip
        lo, hi, last, t_lo, t_hi = stats.tolist()  # one host sync
        if lo < 0 or hi > self.scratch:
            raise ValueError(f"positions must lie in [0, {self.max_len}] (scratch={self.scratch})")
        if t_lo < 0 or t_hi >= self.num_blocks:
            raise ValueError(f"block ids must lie in [0, {self.num_blocks})")
        kv_len = max(last + 1, 1)
        n_read = -(-kv_len // bs)
        if n_read > tables.shape[1]:
            raise ValueError(f"positions up to {last} need {n_read} blocks; the table has "
                             f"{tables.shape[1]}")  # fmt: skip
        # Slots written: the row's block for each position; padding goes to the scratch block.
        blk = tables.gather(1, positions.masked_fill(pad, 0) // bs)
        write = torch.where(pad, self.num_blocks * bs, blk * bs + positions % bs)
        key_pos = torch.arange(kv_len, device=device)
        read = tables[:, key_pos // bs] * bs + key_pos % bs  # [B, kv_len]
        mask = visible_keys(positions, kv_len, one_column=lo == hi == last)
        return PagedView(self, write.reshape(-1), read.reshape(-1), positions.shape[0],
                         kv_len, mask)  # fmt: skip


@dataclass
class PagedView:
    """One forward's addressing into a PagedKVCache: slots to write, slots to read, the mask."""

    cache: PagedKVCache
    write_slots: torch.Tensor  # [B·T]
    read_slots: torch.Tensor  # [B·kv_len]
    batch: int
    kv_len: int
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool, True = attend; None = attend all

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v[B, T, kv, d] at their rows' slots."""
        kv, d = k.shape[-2:]
        self.cache.k[layer].index_copy_(
            0, self.write_slots, k.reshape(-1, kv, d).to(self.cache.k.dtype)
        )
        self.cache.v[layer].index_copy_(
            0, self.write_slots, v.reshape(-1, kv, d).to(self.cache.v.dtype)
        )

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v[B, kv, kv_len, d] gathered from the rows' blocks (a strided view of one copy)."""
        k = self.cache.k[layer].index_select(0, self.read_slots)
        v = self.cache.v[layer].index_select(0, self.read_slots)
        shape = (self.batch, self.kv_len, *k.shape[1:])
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
