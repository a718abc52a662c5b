"""Per-step records of the GRPO example: the /metrics window of a rollout, JSONL, plots.

    window = spec_window(after.delta(before))      # acceptance, accepted length, entropy buckets
    append_jsonl(out / "steps.jsonl", record)
    plot_run(read_jsonl(out / "steps.jsonl"), out / "grpo.png")

Non-finite floats are written as null, so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PANELS = (
    ("reward", "mean reward"),
    ("policy_entropy", "policy entropy (nats, at T)"),
    ("acceptance", "draft acceptance"),
    ("mean_accepted_length", "tokens per verify step"),
    ("rollout_s", "rollout time (s)"),
    ("step_s", "RL step time (s)"),
)


def spec_window(window: Any) -> dict:
    """Speculative-decoding numbers of one /metrics delta (None where nothing was drafted)."""
    buckets = [{"bucket": b.label, "verified": b.verified, "accepted": b.accepted}
               for b in window.acceptance_by_entropy if b.verified]  # fmt: skip
    return {
        "acceptance": window.acceptance_rate,
        "mean_accepted_length": window.mean_accepted_length,
        "per_position_acceptance": window.per_position_acceptance,
        "server_entropy": window.mean_entropy,
        "num_drafts": window.num_drafts,
        "entropy_buckets": buckets,
        "server_generated_tokens": window.value("generation_tokens"),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(_clean(record)) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(records: list[dict], out: Path, title: str = "GRPO on the demo math task") -> Path:
    """A 2x3 grid of the per-step series (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    steps = [r["step"] for r in records]
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        ys = [r.get(key) for r in records]
        pts = [(s, y) for s, y in zip(steps, ys, strict=True) if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3)
        else:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
