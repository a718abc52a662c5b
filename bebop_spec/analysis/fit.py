"""Acceptance as a function of target entropy: the Bebop diagnostic.

Per verified draft position we know H (nats, of the processed target distribution) and
whether the draft was accepted. Bebop reports acceptance per entropy bucket and the least
squares line α ≈ a − b·H (slope = −b per nat: ≈ 0 for an e2e-TV head under rejection
sampling, steeply negative for greedy drafting / CE heads).

    fit = fit_acceptance_vs_entropy(h, accepted)        # raw per-position records
    table = bucket_table(h, accepted)                   # acceptance per entropy bucket
    fit_b = fit_buckets(table)                          # same line from bucket counts
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Bucket edges (nats), the same as the server's acceptance-by-entropy counters.
DEFAULT_EDGES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, math.inf)


@dataclass(frozen=True)
class Fit:
    """α(H) = intercept + slope·H (slope = −b in the paper's α ≈ a − b·H)."""

    slope: float
    intercept: float
    r: float  # (weighted) Pearson correlation of H and acceptance
    n: int  # positions behind the fit
    slope_stderr: float = math.nan

    def line(self) -> str:
        """ "0.850 − 0.030·H" (the paper's a − b·H)."""
        if math.isnan(self.slope):
            return f"{self.intercept:.3f} (no slope: one entropy value)"
        sign = "−" if self.slope < 0 else "+"
        return f"{self.intercept:.3f} {sign} {abs(self.slope):.3f}·H"

    def predict(self, entropy: float | np.ndarray) -> float | np.ndarray:
        return self.intercept + self.slope * entropy

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}  # fmt: skip


@dataclass(frozen=True)
class Bucket:
    """Verified positions with lo <= H < hi."""

    lo: float
    hi: float
    n: int
    accepted: int
    mean_entropy: float  # of the positions in the bucket (midpoint when only counts are known)

    @property
    def rate(self) -> float:
        return self.accepted / self.n if self.n else math.nan

    @property
    def stderr(self) -> float:
        """Binomial standard error of `rate`."""
        return math.sqrt(self.rate * (1 - self.rate) / self.n) if self.n else math.nan

    @property
    def label(self) -> str:
        return f"{self.lo:.2f}-{self.hi:.2f}" if math.isfinite(self.hi) else f"{self.lo:.2f}-inf"

    def to_dict(self) -> dict:
        return {"bucket": self.label, "lo": self.lo, "hi": None if math.isinf(self.hi) else self.hi,
                "n": self.n, "accepted": self.accepted,
                "rate": None if not self.n else self.rate,
                "mean_entropy": None if math.isnan(self.mean_entropy) else self.mean_entropy}  # fmt: skip


def _weighted_line(
    x: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, float, float, float]:
    """Weighted least squares y ≈ a + b·x with frequency weights w -> (b, a, r, stderr(b))."""
    sw = w.sum()
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = (w * (x - mx) ** 2).sum()
    syy = (w * (y - my) ** 2).sum()
    sxy = (w * (x - mx) * (y - my)).sum()
    if sxx <= 0:  # every entropy equal: no slope to fit
        return math.nan, float(my), math.nan, math.nan
    b = sxy / sxx
    a = my - b * mx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0
    resid = (w * (y - a - b * x) ** 2).sum()
    stderr = math.sqrt(resid / (sw - 2) / sxx) if sw > 2 else math.nan
    return float(b), float(a), float(r), float(stderr)


def fit_acceptance_vs_entropy(entropies: Sequence[float] | np.ndarray,
                              accepted: Sequence[bool] | np.ndarray) -> Fit:  # fmt: skip
    """Least squares α ≈ a + slope·H on per-position records (entropy[N] nats, accepted[N])."""
    h = np.asarray(entropies, dtype=np.float64).reshape(-1)
    y = np.asarray(accepted, dtype=np.float64).reshape(-1)
    if h.shape != y.shape:
        raise ValueError(f"{h.size} entropies for {y.size} acceptance flags")
    if h.size == 0:
        raise ValueError("no records to fit")
    if not np.isfinite(h).all() or (h < 0).any():
        raise ValueError("entropies must be finite and >= 0")
    b, a, r, se = _weighted_line(h, y, np.ones_like(h))
    return Fit(b, a, r, int(h.size), se)


def bucket_table(entropies: Sequence[float] | np.ndarray, accepted: Sequence[bool] | np.ndarray,
                 edges: Sequence[float] = DEFAULT_EDGES) -> list[Bucket]:  # fmt: skip
    """Acceptance per entropy bucket [edges[i], edges[i+1]); empty buckets are kept (n = 0)."""
    h = np.asarray(entropies, dtype=np.float64).reshape(-1)
    y = np.asarray(accepted, dtype=bool).reshape(-1)
    edges = check_edges(edges)
    idx = np.searchsorted(np.asarray(edges), h, side="right") - 1
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        sel = idx == i
        n = int(sel.sum())
        out.append(Bucket(lo, hi, n, int(y[sel].sum()), float(h[sel].mean()) if n else math.nan))
    return out


def check_edges(edges: Sequence[float]) -> list[float]:
    e = [float(x) for x in edges]
    if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:], strict=False)) or e[0] < 0:
        raise ValueError(f"bucket edges must increase from >= 0, got {e}")
    return e


def bucket_midpoint(lo: float, hi: float, width_if_open: float = 1.0) -> float:
    """Representative entropy of a bucket known only by its edges (open last bucket: lo + w/2)."""
    return lo + (hi - lo) / 2 if math.isfinite(hi) else lo + width_if_open / 2


def fit_buckets(buckets: Sequence[Bucket]) -> Fit:
    """The same least squares line from bucket counts: each bucket is `n` records at its
    mean entropy with acceptance `rate` (exact for the slope when mean_entropy is the
    bucket's true mean and records are 0/1, up to within-bucket entropy spread)."""
    used = [b for b in buckets if b.n > 0 and not math.isnan(b.mean_entropy)]
    if not used:
        raise ValueError("no populated buckets to fit")
    x = np.array([b.mean_entropy for b in used])
    y = np.array([b.rate for b in used])
    w = np.array([b.n for b in used], dtype=np.float64)
    slope, a, _, _ = _weighted_line(x, y, w)
    # r and stderr from the implied 0/1 records: Var(y) = p(1-p) pooled.
    n = int(w.sum())
    p = float((w * y).sum() / w.sum())
    mx = float((w * x).sum() / w.sum())
    sxx = float((w * (x - mx) ** 2).sum())
    syy = n * p * (1 - p)
    sxy = float((w * (x - mx) * (y - p)).sum())
    r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    resid = syy - (sxy**2 / sxx if sxx > 0 else 0.0)
    se = math.sqrt(resid / (n - 2) / sxx) if n > 2 and sxx > 0 else math.nan
    return Fit(slope, a, r, n, se)
