"""Rejection sampling (RS) vs greedy drafting (TO): which accepts more, where.

Per position, with p the target and q the draft distribution (both after the request's
sampling transforms):
    α_RS = Σ_v min(p(v), q(v)) = 1 − TV(p, q)        α_TO = p(argmax q)
so RS wins exactly where TV(p, q) < 1 − p(argmax q).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bebop_spec.analysis.fit import Bucket, Fit


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p[...,V], q[...,V] -> TV[...] = ½ Σ |p − q|."""
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=-1)


def acceptance_rs(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p[...,V], q[...,V] -> α_RS[...] = Σ min(p, q) = 1 − TV(p, q)."""
    return np.minimum(p, q).sum(axis=-1)


def acceptance_to(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p[...,V], q[...,V] -> α_TO[...] = p(argmax q)."""
    p, q = np.asarray(p), np.asarray(q)
    return np.take_along_axis(p, q.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def rs_beats_to(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p[...,V], q[...,V] -> bool[...]: TV(p, q) < 1 − p(argmax q)."""
    return total_variation(p, q) < 1.0 - acceptance_to(p, q)


def expected_accepted_length(alphas: Sequence[float] | np.ndarray) -> float:
    """Per-position acceptance α_1..α_γ -> E[A] = Σ_j Π_{i≤j} α_i (tokens per step = 1 + E[A])."""
    return float(np.cumprod(np.asarray(alphas, dtype=np.float64)).sum())


def crossover_entropy(rs: Fit, to: Fit) -> float | None:
    """Entropy where the two fitted lines meet (None if parallel or a fit is degenerate)."""
    ds = rs.slope - to.slope
    if not math.isfinite(ds) or abs(ds) < 1e-12:
        return None
    return (to.intercept - rs.intercept) / ds


def decide(rs: Fit, to: Fit, rs_buckets: Sequence[Bucket] = (),
           to_buckets: Sequence[Bucket] = ()) -> dict:  # fmt: skip
    """Which mode to serve: per measured entropy bucket (higher acceptance wins; n >= 1 in
    both) and from the fitted lines (where they cross, and which wins at low / high H)."""
    per_bucket = []
    for b_rs, b_to in zip(rs_buckets, to_buckets, strict=False):
        if b_rs.n and b_to.n:
            winner = "rs" if b_rs.rate > b_to.rate else "to" if b_to.rate > b_rs.rate else "tie"
            per_bucket.append({"bucket": b_rs.label, "rs": b_rs.rate, "to": b_to.rate,
                               "winner": winner})  # fmt: skip
    h_star = crossover_entropy(rs, to)
    at0 = "rs" if rs.intercept >= to.intercept else "to"
    high = "rs" if rs.slope >= to.slope else "to"  # the flatter line wins at high entropy
    if h_star is None or h_star <= 0:
        summary = f"{high} wins at every entropy >= 0 (fitted lines)"
    else:
        summary = f"{at0} wins below H = {h_star:.2f} nats, {high} above (fitted lines)"
    return {"crossover_entropy": h_star, "summary": summary, "per_bucket": per_bucket}
