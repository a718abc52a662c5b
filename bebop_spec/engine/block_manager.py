"""KV block bookkeeping: which blocks each sequence holds, and hash-based prefix sharing.

Plain Python over block ids (the runner owns the tensors, models/paged_kv_cache.py). A block
holds `block_size` consecutive positions of the target cache and, at the same ids, of the MTP
head's cache. Blocks are reference-counted; a sequence's blocks are `seq.block_table`.

Prefix sharing. Block k of a sequence is identified by a chain hash of its tokens *and the
token after it*: the head's entry at a block's last position j is the pair (h_j, x_{j+1}), so
its content depends on x_{j+1} as well. A block is registered once its prefill is planned
(full, and followed by a token the same prefill feeds); a later sequence whose first blocks
hash the same reuses them and prefills only the rest. Siblings admitted in the same prefill
batch share too: a row that reuses blocks another row of the batch fills gets a higher
`seq.prefill_level`, and the runner feeds the levels in order (level 0 first). Shared
blocks are never written: decoding writes only at positions past the prefill. A freed block
keeps its hash and serves hits until it is reused (least recently freed first).
`invalidate()` forgets every hash: weight updates and /flush_cache call it, since K/V
computed under old weights must not serve new requests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from bebop_spec.engine.sequence import Sequence


@dataclass
class PrefixStats:
    """Counters since start: tokens prefills needed, and how many a prefix hit covered."""

    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks  # (hash, tokens) when cached
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.filling: dict[int, int] = {}  # block -> prefill level of the row filling it
        self.stats = PrefixStats()

    # ------------------------------------------------------------------ sizes
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold positions 0..positions-1."""
        return -(-positions // self.block_size)

    # ------------------------------------------------------------------ prefix hashing
    def _keys(self, seq: Sequence) -> list[tuple[int, tuple[int, ...]]]:
        """(chain hash, tokens) of every block a prefill of `seq` may share: full blocks
        whose positions and next token the prefill feeds, the last fed token outside them."""
        if not self.prefix_caching:
            return []
        ids, bs, n_feed = seq.all_ids, self.block_size, seq.num_prefill_tokens
        keys, parent = [], 0
        for k in range((n_feed - 1) // bs):
            toks = tuple(ids[k * bs : (k + 1) * bs + 1])
            parent = hash((parent, toks))
            keys.append((parent, toks))
        return keys

    def _hits(self, keys: list[tuple[int, tuple[int, ...]]]) -> list[int]:
        """Block ids of the longest cached prefix of `keys` (tokens compared, not just hashes)."""
        hits = []
        for key in keys:
            bid = self.cached.get(key[0])
            if bid is None or self.block_key[bid] != key:
                break
            hits.append(bid)
        return hits

    # ------------------------------------------------------------------ allocate / free
    def begin_batch(self) -> None:
        """A new prefill batch: blocks filled by earlier batches are complete."""
        self.filling.clear()

    def allocate(self, seq: Sequence, reserve: int = 0) -> int | None:
        """Give `seq` blocks for its prefill, reusing a cached prefix, if that leaves `reserve`
        blocks free; returns the positions the prefix covers (the prefill starts there), or
        None (nothing allocated) when it does not fit."""
        keys = self._keys(seq)
        hits = self._hits(keys)[: seq.max_prefix_hit // self.block_size]
        revived = sum(1 for b in hits if self.ref[b] == 0)  # cached but free: leaves the pool
        if self.blocks_for(seq.num_prefill_tokens) - len(hits) + revived + reserve > len(self.free):
            return None
        for b in hits:
            self._ref(b)
        table = hits + [self._take() for _ in range(self.blocks_for(seq.num_prefill_tokens) -
                                                    len(hits))]  # fmt: skip
        # A row reading blocks that this batch fills runs after the rows that fill them.
        seq.prefill_level = 1 + max((self.filling[b] for b in hits if b in self.filling),
                                    default=-1)  # fmt: skip
        for k in range(len(hits), len(table)):
            self.filling[table[k]] = seq.prefill_level
        for k in range(len(hits), len(keys)):  # this prefill fills them: later rows may share
            self.cached[keys[k][0]] = table[k]
            self.block_key[table[k]] = keys[k]
        seq.block_table = table
        covered = len(hits) * self.block_size
        self.stats.queried_tokens += seq.num_prefill_tokens
        self.stats.hit_tokens += covered
        return covered

    def can_append(self, seq: Sequence, positions: int) -> bool:
        return self.blocks_for(positions) - len(seq.block_table) <= len(self.free)

    def append(self, seq: Sequence, positions: int) -> None:
        """Grow `seq`'s table to hold positions 0..positions-1. Call can_append first."""
        for _ in range(self.blocks_for(positions) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody holds return to the pool (tail first, so a
        prompt prefix outlives the tokens generated after it)."""
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        seq.block_table = []

    def invalidate(self) -> None:
        """Forget every cached prefix (weights changed, or /flush_cache)."""
        self.cached.clear()
        self.block_key = [None] * self.num_blocks

    def _ref(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def _take(self) -> int:
        """A free block, least recently freed first; it stops serving prefix hits."""
        b, _ = self.free.popitem(last=False)
        key = self.block_key[b]
        if key is not None:
            if self.cached.get(key[0]) == b:
                del self.cached[key[0]]
            self.block_key[b] = None
        self.ref[b] = 1
        return b
