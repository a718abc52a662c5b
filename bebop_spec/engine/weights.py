"""Atomic in-place weight updates: validate every tensor first, then copy.

A rejected update raises `WeightUpdateError` before any parameter is touched, so the old
weights keep serving. Accepted dtypes: any floating dtype (cast to the parameter's dtype);
integer/bool tensors are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from bebop_spec.errors import WeightUpdateError


def validate_weight_update(
    params: Mapping[str, torch.nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Map update names to parameter names and check them all; returns {param_name: tensor}."""
    aliases = aliases or {}
    if not tensors:
        raise WeightUpdateError("weight update carries no tensors")
    resolved: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        target = aliases.get(name, name)
        if target not in params:
            raise WeightUpdateError(f"unknown parameter name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise WeightUpdateError(f"{name}: not a tensor")
        p = params[target]
        if tuple(t.shape) != tuple(p.shape):
            raise WeightUpdateError(
                f"{name}: shape {tuple(t.shape)} does not match {tuple(p.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise WeightUpdateError(f"{name}: dtype {t.dtype} is not a floating dtype")
        if not all_finite(t):
            raise WeightUpdateError(f"{name}: contains NaN or Inf")
        resolved[target] = t
    return resolved


def all_finite(t: torch.Tensor) -> bool:
    """True iff no NaN/Inf: one float64 reduction (a NaN or Inf anywhere makes the sum
    non-finite), ~10× cheaper than materialising isfinite() over 100M elements."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


@torch.no_grad()
def apply_weight_update(
    params: Mapping[str, torch.nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    resolved = validate_weight_update(params, tensors, aliases)
    for name, t in resolved.items():
        params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
    return list(resolved)


def tensor_digests(params: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, str]:
    """{prefix + name: SHA-256 hex of the tensor's bytes} (vLLM's /weight_checker digests:
    equal digests mean bit-identical weights, whatever the dtype)."""
    return {
        prefix + name: hashlib.sha256(
            t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        ).hexdigest()
        for name, t in params.items()
    }
