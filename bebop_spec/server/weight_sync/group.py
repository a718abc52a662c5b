"""A weight-update process group, formed exactly as SGLang's `init_custom_process_group`.

TCP rendezvous at `tcp://master_address:master_port`, the store wrapped in
`PrefixStore(group_name, store)`, and a new (non-default) process group over it. The
trainer is rank 0 and broadcasts; this server joins at `rank_offset`. All blocking
collectives run on one dedicated thread per group, so the event loop keeps serving while a
broadcast is in flight, and operations on one group stay ordered.

The wire contract (how the group is formed, the flattened-bucket layout) has one home, the
trainer's package: bebop_client.process_group and bebop_client.bucket, which both ends call.
`init_custom_process_group` stays importable from here for trainers and tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from bebop_client.bucket import nbytes, unflatten_bucket
from bebop_client.process_group import init_custom_process_group, tcp_init_method

from bebop_spec.errors import WeightUpdateError

__all__ = ["WeightUpdateGroup", "init_custom_process_group"]


class WeightUpdateGroup:
    """One joined group: receives the trainer's broadcasts on its own thread."""

    def __init__(self, name: str, backend: str, device: str, timeout_s: float) -> None:
        self.name, self.backend, self.device = name, backend, device
        self.timeout_s = timeout_s
        self.pg: dist.ProcessGroup | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wgroup-{name}")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def join(self, master_address: str, master_port: int, rank: int, world_size: int) -> None:
        def init() -> None:
            self.pg = init_custom_process_group(
                self.backend,
                tcp_init_method(master_address, master_port),
                world_size,
                rank,
                self.name,
                self.timeout_s,
            )

        await self._run(init)

    async def receive(
        self,
        names: Sequence[str],
        dtypes: Sequence[torch.dtype],
        shapes: Sequence[Sequence[int]],
        flattened: bool,
    ) -> dict[str, torch.Tensor]:
        """The trainer's broadcasts for one update: one per tensor in `names` order, or a
        single uint8 buffer (`flattened_bucket`)."""
        if self.pg is None:
            raise WeightUpdateError(f"group {self.name!r} is not initialised")
        return await self._run(self._receive, list(names), list(dtypes), list(shapes), flattened)

    def _receive(self, names, dtypes, shapes, flattened) -> dict[str, torch.Tensor]:
        if flattened:
            total = sum(nbytes(s, d) for s, d in zip(shapes, dtypes, strict=True))
            buffer = torch.empty(total, dtype=torch.uint8, device=self.device)
            dist.broadcast(buffer, src=0, group=self.pg)
            return unflatten_bucket(buffer, names, dtypes, shapes)
        out = {}
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            t = torch.empty(tuple(shape), dtype=dtype, device=self.device)
            dist.broadcast(t, src=0, group=self.pg)
            out[name] = t
        return out

    async def destroy(self) -> None:
        def stop() -> None:
            if self.pg is not None:
                dist.destroy_process_group(self.pg)
                self.pg = None

        try:
            await self._run(stop)
        finally:
            self._thread.shutdown(wait=False)
