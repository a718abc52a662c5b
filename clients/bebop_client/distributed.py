"""Trainer side (rank 0) of the SGLang weight-update group. Needs torch (`bebop-client[dist]`).

The group is formed exactly as SGLang's `init_custom_process_group` (and slime / AReaL's
trainers) do it: TCP rendezvous at `tcp://master_address:master_port`, the store wrapped in
`PrefixStore(group_name, store)`, a new process group over it (the default group is never
touched). The trainer is rank 0 and hosts the store; server ranks start at `rank_offset`.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Sequence
from typing import Any


def tcp_init_method(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout_s: float = 600.0) -> Any:  # fmt: skip
    """Join (rank > 0) or host (rank 0) a named process group outside the default group."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def to_torch(x: Any, device: str) -> Any:
    """A contiguous torch tensor on `device` (numpy arrays are converted)."""
    import numpy as np
    import torch

    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device).contiguous()


def start_broadcasts(pg: Any, tensors: Sequence[Any], flattened: bool) -> list[Any]:
    """Broadcast from rank 0, asynchronously: one call per tensor in order, or (flattened)
    one uint8 buffer of the tensors' bytes back to back. Returns the pending works."""
    import torch
    import torch.distributed as dist

    if flattened:
        buffer = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
        return [dist.broadcast(buffer, src=0, group=pg, async_op=True)]
    return [dist.broadcast(t, src=0, group=pg, async_op=True) for t in tensors]


def destroy(pg: Any) -> None:
    import torch.distributed as dist

    dist.destroy_process_group(pg)


class Concurrent:
    """Run fn(url) for each url on its own thread (the HTTP side of a collective); collect
    results and errors."""

    def __init__(self, fn: Callable[[str], Any], urls: Sequence[str]) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, Exception] = {}

        def run(u: str) -> None:
            try:
                self.results[u] = fn(u)
            except Exception as exc:
                self.errors[u] = exc

        self.threads = [threading.Thread(target=run, args=(u,), daemon=True) for u in urls]
        for t in self.threads:
            t.start()

    def failed_early(self) -> bool:
        return bool(self.errors)

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def wait(self) -> dict[str, Exception]:
        for t in self.threads:
            t.join()
        return self.errors
