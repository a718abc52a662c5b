"""bebop-client: the trainer's side of a Bebop (or SGLang) rollout server.

from bebop_client import RolloutClient, WeightSync
client = RolloutClient(["http://127.0.0.1:30000"])
group = client.generate(prompt_ids, {"temperature": 1.0, "max_new_tokens": 256}, n=8)
WeightSync(client).push_tensor(model.state_dict(), weight_version=step)
print(client.metrics().acceptance_by_entropy)
"""

from bebop_client.async_client import AsyncRolloutClient
from bebop_client.client import RolloutClient
from bebop_client.errors import (
    AuthenticationError,
    BebopClientError,
    ProtocolError,
    RequestRejected,
    RequestTimeout,
    ServerError,
    ServerOverloaded,
    ServerUnreachable,
    VersionConflict,
    WeightSyncError,
)
from bebop_client.metrics import EntropyBucket, Metrics, parse_metrics
from bebop_client.sample import Sample
from bebop_client.transport import EndpointPool, RetryPolicy
from bebop_client.weights import WeightSync

__version__ = "0.1.0"

__all__ = [
    "AsyncRolloutClient",
    "AuthenticationError",
    "BebopClientError",
    "EndpointPool",
    "EntropyBucket",
    "Metrics",
    "ProtocolError",
    "RequestRejected",
    "RequestTimeout",
    "RetryPolicy",
    "RolloutClient",
    "Sample",
    "ServerError",
    "ServerOverloaded",
    "ServerUnreachable",
    "VersionConflict",
    "WeightSync",
    "WeightSyncError",
    "parse_metrics",
]
