"""Weight pushes of the GRPO example: `WeightSync` over a gloo group (or the HTTP body).

    with Pusher(client, "distributed", "127.0.0.1") as pusher:
        base = pusher.start(policy, head)        # form the group, push the trainer's copy once
        version = pusher.push(policy, head, base + 1)

`start` pushes the trainer's weights at the served version before any rollout: the server
then provably serves the trainer's copy, and a model whose tensor names or shapes differ
from the served one fails here (WeightSyncError naming the tensor), not after a step.
"""

from __future__ import annotations

from typing import Any

from bebop_client import WeightSync
from grpo_server import free_port
from grpo_trainer import named_tensors


def served_version(versions: dict[str, str]) -> int:
    """The highest integer label the servers report (0 when none is an integer)."""
    ints = [int(v) for v in versions.values() if v.lstrip("-").isdigit()]
    return max(ints, default=0)


class Pusher:
    def __init__(self, client: Any, method: str, master_address: str) -> None:
        self.sync = WeightSync(client, selector="target")  # pauses generation in place
        self.method, self.master_address = method, master_address

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sync.close()  # destroys the group on both sides

    def start(self, policy: Any, head: Any) -> int:
        """Form the gloo group (trainer = rank 0) and push the initial weights; returns the
        integer version they are served under."""
        if self.method == "distributed":
            self.sync.init_group(self.master_address, free_port(), backend="gloo")
        base = served_version(self.sync.client.weight_versions())
        self.push(policy, head, base)
        return base

    def push(self, policy: Any, head: Any, version: int) -> str:
        """Target weights (selector target), then the head's when it is trained (draft)."""
        label = self.sync.push(named_tensors(policy), self.method, weight_version=version)
        if head is not None:
            label = self.sync.push(named_tensors(head), self.method, weight_version=version,
                                   selector="draft")  # fmt: skip
        return label
