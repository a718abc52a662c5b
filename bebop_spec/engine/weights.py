"""Atomic in-place weight updates: validate every tensor first, then copy.

A rejected update raises `WeightUpdateError` before any parameter is touched, so the old
weights keep serving. Accepted dtypes: any floating dtype (cast to the parameter's dtype);
integer/bool tensors are refused. `check_update` is the one validator: the engine runs it
before copying, and the server runs it first (off the engine thread) for every backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from bebop_spec.errors import WeightUpdateError

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # parameter name -> (shape, dtype)
TIED_EMBEDDING, TIED_HEAD = "model.embed_tokens.weight", "lm_head.weight"
MAX_REPORTED = 8


def spec_of(params: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(p.shape), p.dtype) for k, p in params.items()}


def tied_aliases(spec: Spec, selector: str) -> dict[str, str]:
    """Names a trainer sends that are stored under another name: a model with tied
    embeddings has no lm_head parameter, and its lm_head update goes to embed_tokens."""
    if selector != "draft" and TIED_EMBEDDING in spec and TIED_HEAD not in spec:
        return {TIED_HEAD: TIED_EMBEDDING}
    return {}


def all_finite(t: torch.Tensor) -> bool:
    """True iff no NaN/Inf in t. Fast path: a float32 sum is finite only if every element is
    (NaN and Inf propagate through addition); only a non-finite sum, which a huge but finite
    tensor could also produce, pays for the elementwise check."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def check_update(tensors: Mapping[str, torch.Tensor], spec: Spec,
                 aliases: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The one validator of weight updates: every tensor has a known name (through
    `aliases`), the exact shape, a floating dtype (cast to the parameter's) and finite
    values. Returns {parameter name: tensor ready to copy}; any problem rejects the whole
    update with a WeightUpdateError listing the problems."""
    if not tensors:
        raise WeightUpdateError("the update holds no tensors")
    aliases = aliases or {}
    problems: list[str] = []
    ready: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        target = aliases.get(name, name)
        if target not in spec:
            problems.append(f"unknown parameter {name!r}")
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name}: not a tensor")
            continue
        shape, dtype = spec[target]
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(t.shape)} != expected {tuple(shape)}")
            continue
        if t.dtype != dtype and not (t.dtype.is_floating_point and dtype.is_floating_point):
            problems.append(f"{name}: dtype {t.dtype} cannot replace {dtype}")
            continue
        t = t.to(dtype) if t.dtype != dtype else t
        if t.dtype.is_floating_point and not all_finite(t):
            problems.append(f"{name}: holds non-finite values")
            continue
        ready[target] = t
    if problems:
        more = f" (+{len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise WeightUpdateError("; ".join(problems[:MAX_REPORTED]) + more)
    return ready


@torch.no_grad()
def apply_weight_update(
    params: Mapping[str, torch.nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """check_update, then copy every tensor in place (nothing is copied if any is refused)."""
    ready = check_update(tensors, spec_of(params), aliases)
    for name, t in ready.items():
        params[name].copy_(t.to(device=params[name].device))
    return list(ready)


def tensor_digests(params: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, str]:
    """{prefix + name: SHA-256 hex of the tensor's bytes} (vLLM's /weight_checker digests:
    equal digests mean bit-identical weights, whatever the dtype)."""
    return {
        prefix + name: hashlib.sha256(
            t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        ).hexdigest()
        for name, t in params.items()
    }
