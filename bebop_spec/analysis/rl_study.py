"""RL-study records -> per-configuration summaries, targets, a markdown table and plots.

    summaries = {name: summarize(run["records"], warmup=1) for name, run in runs.items()}
    add_speedups(summaries)                 # against the "none" configuration
    print(table(summaries, labels)); plot(runs, summaries, out_dir, labels)

A record is one RL step as `clients/examples/grpo.py` logs it (acceptance, policy_entropy,
mean_accepted_length, reward, rollout_s, step_s, completion_tokens, entropy_buckets).
Used by `benchmarks/rl_study.py`; tests: tests/clients/test_rl_example_study.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from bebop_spec.analysis.fit import (
    Bucket,
    Fit,
    bucket_midpoint,
    fit_acceptance_vs_entropy,
    fit_buckets,
)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def position_buckets(records: list[dict]) -> list[Bucket]:
    """Verified draft positions by target-entropy bucket, summed over the run's steps."""
    counts: dict[str, list[float]] = {}
    for r in records:
        for b in r.get("entropy_buckets") or []:
            c = counts.setdefault(b["bucket"], [0.0, 0.0])
            c[0], c[1] = c[0] + b["verified"], c[1] + b["accepted"]
    out = []
    for label, (n, a) in counts.items():
        lo, _, hi = label.partition("-")
        lo_f, hi_f = float(lo), math.inf if hi == "inf" else float(hi)
        out.append(Bucket(lo_f, hi_f, int(n), int(a), bucket_midpoint(lo_f, hi_f)))
    return sorted(out, key=lambda b: b.lo)


def _fit(xs: list, ys: list) -> dict | None:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    if len(pts) < 3:
        return None
    return fit_acceptance_vs_entropy(*zip(*pts, strict=True)).to_dict()


def summarize(records: list[dict], warmup: int) -> dict:
    """Per-configuration figures: first/last quarter means, drift, fits, mean times."""
    k = max(1, len(records) // 4)
    acc = [r.get("acceptance") for r in records]
    ent = [r.get("policy_entropy") for r in records]
    timed = records[warmup:] or records
    s = {
        "steps": len(records),
        "acceptance_first": _mean(acc[:k]), "acceptance_last": _mean(acc[-k:]),
        "acceptance_mean": _mean(acc),
        "accepted_length_mean": _mean([r.get("mean_accepted_length") for r in records]),
        "entropy_first": _mean(ent[:k]), "entropy_last": _mean(ent[-k:]),
        "reward_first": _mean([r["reward"] for r in records[:k]]),
        "reward_last": _mean([r["reward"] for r in records[-k:]]),
        "rollout_s": _mean([r["rollout_s"] for r in timed]),
        "step_s": _mean([r["step_s"] for r in timed]),
        "tokens_per_step": _mean([r["completion_tokens"] for r in records]),
        "fit_steps_acceptance": _fit(ent, acc),
        "fit_steps_length": _fit(ent, [r.get("mean_accepted_length") for r in records]),
    }  # fmt: skip
    if s["acceptance_first"] is not None:
        s["drift_pts"] = 100 * (s["acceptance_last"] - s["acceptance_first"])
    buckets = position_buckets(records)
    if sum(b.n for b in buckets) and len([b for b in buckets if b.n]) >= 2:
        s["fit_positions"] = fit_buckets(buckets).to_dict()
        s["buckets"] = [b.to_dict() for b in buckets]
    return s


def add_speedups(summaries: dict) -> None:
    base = summaries.get("none")
    for s in summaries.values():
        if base and s.get("step_s") and base.get("step_s"):
            s["step_speedup"] = base["step_s"] / s["step_s"]
            s["rollout_speedup"] = base["rollout_s"] / s["rollout_s"]


def check_targets(s: dict) -> list[dict]:
    """The issue's targets, measured (never asserted): slope ratio, drift, step speedup."""
    out = []
    tv, to = s.get("rs_tv") or {}, s.get("to_ce") or {}
    for kind in ("fit_positions", "fit_steps_length"):
        if tv.get(kind) and to.get(kind):
            a, b = abs(tv[kind]["slope"] or 0), abs(to[kind]["slope"] or 0)
            out.append({"target": f"|slope| rs_tv <= |slope| to_ce / 3 ({kind})",
                        "measured": f"{a:.3f} vs {b:.3f}", "met": a <= b / 3})  # fmt: skip
    if "drift_pts" in tv and "drift_pts" in to:
        out.append({"target": "rs_tv drifts <= 3 pts while to_ce degrades",
                    "measured": f"rs_tv {tv['drift_pts']:+.1f} pts, to_ce {to['drift_pts']:+.1f} pts",
                    "met": abs(tv["drift_pts"]) <= 3 and to["drift_pts"] < 0})  # fmt: skip
    for name, goal in (("rs_tv", 1.4), ("rs_tv_auto", 1.2)):
        run = s.get(name) or {}
        if run.get("step_speedup"):
            out.append({"target": f"RL step {name} >= {goal}x faster than no speculation",
                        "measured": f"{run['step_speedup']:.2f}x (rollout {run['rollout_speedup']:.2f}x)",
                        "met": run["step_speedup"] >= goal})  # fmt: skip
    return out


# ------------------------------------------------------------------------ report
def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _slope(fit: dict | None) -> str:
    if not fit or fit.get("slope") is None:
        return "–"
    return f"{fit['slope']:+.3f} (r {_f(fit.get('r'), '+.2f')})"


def table(summaries: dict, labels: dict[str, str] | None = None) -> str:
    """Markdown table, one row per configuration (`labels` names them; default: the key)."""
    labels = labels or {}
    rows = ["| config | acceptance first → last | drift (pts) | tokens / verify | entropy "
            "first → last (nats) | slope / nat, positions (r) | slope / nat, steps: accepted "
            "length (r) | rollout s | step s | step speedup | reward first → last |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in summaries.items():
        rows.append(
            f"| {labels.get(name, name)} | {_f(s['acceptance_first'])} → {_f(s['acceptance_last'])} "
            f"| {_f(s.get('drift_pts'), '+.1f')} | {_f(s['accepted_length_mean'], '.2f')} "
            f"| {_f(s['entropy_first'])} → {_f(s['entropy_last'])} "
            f"| {_slope(s.get('fit_positions'))} | {_slope(s.get('fit_steps_length'))} "
            f"| {_f(s['rollout_s'], '.1f')} | {_f(s['step_s'], '.1f')} "
            f"| {_f(s.get('step_speedup'), '.2f')}× "
            f"| {_f(s['reward_first'], '.2f')} → {_f(s['reward_last'], '.2f')} |"
        )
    return "\n".join(rows)


SERIES = (("acceptance", "draft acceptance"), ("policy_entropy", "policy entropy (nats)"),
          ("mean_accepted_length", "tokens per verify step"), ("step_s", "RL step time (s)"))  # fmt: skip


def plot(runs: dict, summaries: dict, out: Path, labels: dict[str, str] | None = None) -> None:
    """out/rl_study.png (per-step series) and out/acceptance_vs_entropy.png (per-position fits)."""
    labels = labels or {}
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    from bebop_spec.analysis.plot import plot_groups

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, SERIES, strict=True):
        for i, (name, run) in enumerate(runs.items()):
            pts = [(r["step"], r.get(key)) for r in run["records"] if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", ms=3, color=f"C{i}",
                        label=labels.get(name, name))  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes.flat[1].legend(fontsize=7)  # every configuration has an entropy series
    fig.tight_layout()
    fig.savefig(out / "rl_study.png", dpi=110)
    plt.close(fig)
    groups = [(labels.get(n, n), Fit(**s["fit_positions"]), [Bucket(
        b["lo"], b["hi"] if b["hi"] is not None else math.inf, b["n"], b["accepted"],
        b["mean_entropy"]) for b in s["buckets"]]) for n, s in summaries.items()
        if (s.get("fit_positions") or {}).get("slope") is not None]  # fmt: skip
    if groups:
        plot_groups(groups, out / "acceptance_vs_entropy.png",
                    title="Acceptance per draft position vs target entropy (RL rollouts)")  # fmt: skip
