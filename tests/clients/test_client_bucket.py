"""The flattened weight bucket (bebop_client.bucket): the one layout the trainer packs and the
server's weight-update group unpacks."""

from __future__ import annotations

import pytest
import torch
from bebop_client.bucket import flatten_bucket, nbytes, unflatten_bucket

from bebop_spec.server.weight_sync import group


def test_flattened_bucket_matches_sglang_layout():
    """`flattened_bucket` = tensors' bytes back to back in names order (SGLang's
    FlattenedTensorBucket: flatten().view(uint8), concatenated), mixed dtypes included.
    The trainer's packing builds exactly that buffer and the server's unpacking inverts it;
    a buffer of the wrong size or an unaligned offset is refused."""
    named = {"a": torch.randn(2, 3), "b": torch.randn(6).to(torch.bfloat16), "c": torch.randn(4, 1)}
    buffer = torch.cat([t.flatten().view(torch.uint8) for t in named.values()])
    assert torch.equal(flatten_bucket(list(named.values())), buffer)
    dtypes = [t.dtype for t in named.values()]
    shapes = [list(t.shape) for t in named.values()]
    assert sum(nbytes(s, d) for s, d in zip(shapes, dtypes, strict=True)) == buffer.numel()
    out = unflatten_bucket(buffer, list(named), dtypes, shapes)
    for k, t in named.items():
        assert torch.equal(out[k], t)
    with pytest.raises(ValueError, match="bucket holds"):
        unflatten_bucket(buffer[:-1], list(named), dtypes, shapes)
    with pytest.raises(ValueError, match="unaligned"):
        unflatten_bucket(
            torch.zeros(6, dtype=torch.uint8),
            ["x", "y"],
            [torch.bfloat16, torch.float32],
            [[1], [1]],
        )


def test_server_group_uses_the_clients_wire_contract():
    """Invariant (one home, #12 D10): the server's weight-update group forms the group and
    unpacks buckets with bebop_client's own functions, not copies of them."""
    import bebop_client.bucket
    import bebop_client.process_group

    assert group.init_custom_process_group is bebop_client.process_group.init_custom_process_group
    assert group.tcp_init_method is bebop_client.process_group.tcp_init_method
    assert group.unflatten_bucket is bebop_client.bucket.unflatten_bucket
    assert bebop_client.process_group.tcp_init_method("::1", 5) == "tcp://[::1]:5"
    assert bebop_client.process_group.tcp_init_method("10.0.0.5", 29600) == "tcp://10.0.0.5:29600"
