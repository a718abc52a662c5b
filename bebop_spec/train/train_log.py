"""The trainer's JSONL log (one record per logged step, RUN/train_log.jsonl) and its plot:
`read_log(path)` -> the records, `plot_training_curve(path, png)` -> loss and α per step.
"""

from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


def truncate_log(path: Path, keep_through: int) -> None:
    """Drop records past the resumed step (written after the last checkpoint of a crashed run)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= keep_through]
    path.write_text("".join(ln + "\n" for ln in kept))


def append_record(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(log_path: str | Path) -> list[dict]:
    """The JSONL training log as a list of records."""
    lines = Path(log_path).read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def plot_training_curve(log_path: str | Path, out_png: str | Path) -> Path:
    """Loss and per-position soft acceptance against step, from the JSONL log, as a PNG."""
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    records = read_log(log_path)
    if not records:
        raise ValueError(f"{log_path}: no records to plot")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    for i in range(len(records[0]["alpha"])):
        ax_alpha.plot(steps, [r["alpha"][i] for r in records], label=f"α{i + 1}")
    ax_alpha.set(xlabel="step", ylabel="Σ min(p, q)", title="soft acceptance per position")
    ax_alpha.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
