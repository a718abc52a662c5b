"""Acceptance vs entropy plot: bucket means (± binomial s.e.) and the fitted lines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bebop_spec.analysis.fit import Bucket, Fit


def plot_groups(groups: Sequence[tuple[str, Fit, Sequence[Bucket]]], out: str | Path,
                title: str = "Acceptance vs target entropy") -> Path:  # fmt: skip
    """groups: (label, fit, buckets) -> a PNG at `out` (matplotlib, Agg backend)."""
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xmax = 0.5
    for i, (label, fit, buckets) in enumerate(groups):
        color = f"C{i % 10}"
        used = [b for b in buckets if b.n > 0]
        x = np.array([b.mean_entropy for b in used])
        y = np.array([b.rate for b in used])
        err = np.array([b.stderr for b in used])
        if used:
            xmax = max(xmax, float(x.max()))
            ax.errorbar(x, y, yerr=err, fmt="o", color=color, ms=4, capsize=2)
        if np.isfinite(fit.slope):
            xs = np.linspace(0.0, xmax * 1.05, 50)
            ax.plot(xs, fit.predict(xs), "-", color=color,
                    label=f"{label}: α ≈ {fit.line()} (n={fit.n})")  # fmt: skip
        else:
            ax.plot([], [], "o", color=color, label=f"{label} (no slope)")
    ax.set_xlabel("target entropy H (nats)")
    ax.set_ylabel("acceptance per draft position")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0.0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
