"""The weight-update process group both ends form: the one home of how it is built.

Formed exactly as SGLang's `init_custom_process_group` (and slime / AReaL / verl / OpenRLHF's
trainers) do it: TCP rendezvous at `tcp://master_address:master_port`, the store wrapped in
`PrefixStore(group_name, store)`, a new process group over it (the default group is never
touched). The trainer (bebop_client.weights) is rank 0 and hosts the store; the server
(bebop_spec.server.weight_sync.group) joins at `rank_offset` with this same function, so
either end may also be SGLang's. Needs torch (`bebop-client[dist]`), imported when called.
"""

from __future__ import annotations

import datetime
from typing import Any


def tcp_init_method(host: str, port: int) -> str:
    """torch.distributed's init_method for a TCP store at host:port (IPv6 in brackets)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout_s: float | None = None) -> Any:  # fmt: skip
    """Join (rank > 0) or host (rank 0) a named process group outside the default group.

    `timeout_s` bounds the rendezvous and every collective; None: torch's default (30 min)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        default_pg_timeout,
        rendezvous,
    )

    timeout = default_pg_timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
