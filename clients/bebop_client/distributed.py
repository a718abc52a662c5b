"""Trainer side (rank 0) of the SGLang weight-update group. Needs torch (`bebop-client[dist]`).

The group itself is formed by bebop_client.process_group (the same function the server
joins with); a flattened bucket is laid out by bebop_client.bucket. Here: the broadcasts
from rank 0, and the HTTP calls that run alongside them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from bebop_client.bucket import flatten_bucket


def to_torch(x: Any, device: str) -> Any:
    """A contiguous torch tensor on `device` (numpy arrays are converted)."""
    import numpy as np
    import torch

    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device).contiguous()


def start_broadcasts(pg: Any, tensors: Sequence[Any], flattened: bool) -> list[Any]:
    """Broadcast from rank 0, asynchronously: one call per tensor in order, or (flattened)
    one uint8 buffer of the tensors' bytes back to back. Returns the pending works."""
    import torch.distributed as dist

    if flattened:
        return [dist.broadcast(flatten_bucket(tensors), src=0, group=pg, async_op=True)]
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
