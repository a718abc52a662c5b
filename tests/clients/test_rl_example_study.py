"""benchmarks/rl_study.py analysis on synthetic per-step records (no runs): the position-level
fit recovers a known line from summed entropy buckets, drift and speedups are the stated
ratios, the targets are evaluated (never asserted by the study), and the table / plots are
written for every configuration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("rl_study", REPO / "benchmarks/rl_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rl_study"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def records(acc0: float, drift: float, slope: float, step_s: float, steps: int = 8) -> list:
    """Steps whose acceptance moves by `drift` over the run and whose per-bucket acceptance
    follows 0.9 + slope·H at the bucket midpoints (1000 positions per bucket per step)."""
    out = []
    for t in range(steps):
        buckets = []
        for label, mid in (("0.00-0.25", 0.125), ("0.50-1.00", 0.75), ("2.00-3.00", 2.5)):
            buckets.append(
                {"bucket": label, "verified": 1000, "accepted": round(1000 * (0.9 + slope * mid))}
            )
        out.append({"step": t, "acceptance": acc0 + drift * t / (steps - 1),
                    "policy_entropy": 0.5 + 0.1 * t, "mean_accepted_length": 3.0,
                    "reward": 0.1, "rollout_s": step_s * 0.8, "step_s": step_s,
                    "completion_tokens": 100, "entropy_buckets": buckets})  # fmt: skip
    return out


def test_summaries_fits_targets_and_report(study, tmp_path):
    """On synthetic records the position fit recovers each planted slope (±2e-3, n = 8·3000), step
    speedups are the step-time ratios to "none" and drift has the planted sign; all 4 targets
    (auto's step speedup 1.25x among them) are met, the table and both plots are written, and the summaries are JSON-serialisable."""
    runs = {
        "none": {"records": [{**r, "acceptance": None, "mean_accepted_length": None,
                              "entropy_buckets": []} for r in records(0, 0, 0, 10.0)]},
        "to_ce": {"records": records(0.7, -0.08, -0.3, 7.0)},
        "rs_tv": {"records": records(0.8, -0.01, -0.02, 5.0)},
        "rs_tv_auto": {"records": records(0.8, -0.01, -0.02, 8.0)},
    }  # fmt: skip
    summaries = {n: study.summarize(r["records"], warmup=1) for n, r in runs.items()}
    study.add_speedups(summaries)
    tv, to = summaries["rs_tv"], summaries["to_ce"]
    assert tv["fit_positions"]["slope"] == pytest.approx(-0.02, abs=2e-3)
    assert to["fit_positions"]["slope"] == pytest.approx(-0.3, abs=2e-3)
    assert tv["fit_positions"]["n"] == 8 * 3000
    assert tv["step_speedup"] == pytest.approx(2.0) and to["step_speedup"] == pytest.approx(10 / 7)
    assert to["drift_pts"] < -5 and abs(tv["drift_pts"]) < 3
    assert "fit_positions" not in summaries["none"] and "drift_pts" not in summaries["none"]
    met = {t["target"].split(" (")[0]: t["met"] for t in study.check_targets(summaries)}
    assert all(met.values()) and len(met) == 4
    assert summaries["rs_tv_auto"]["step_speedup"] == pytest.approx(1.25)
    md = study.table(summaries, {n: c.label for n, c in study.CONFIGS.items()})
    assert md.count("\n") == 5 and "rs + e2e-TV head" in md and "2.00×" in md
    study.plot(runs, summaries, tmp_path, {n: c.label for n, c in study.CONFIGS.items()})
    assert (tmp_path / "rl_study.png").exists() and (
        tmp_path / "acceptance_vs_entropy.png"
    ).exists()
    json.dumps(summaries)  # JSON-ready


def test_grpo_command_keeps_the_run_identical_across_configs(study):
    """Only the rollout side (draft mode, head, online loss, spec policy) differs between
    configurations; every default configuration drafts a fixed γ, rs_tv_auto runs `auto`."""
    args = study.parser().parse_args(["--steps", "3", "--max-tokens", "32"])
    heads = {"ce": "/h/ce", "e2e_tv": "/h/tv"}
    cmds = {n: study.grpo_command(c, Path("/m"), heads, Path("/o"), args)
            for n, c in study.CONFIGS.items()}  # fmt: skip

    def shared(cmd: list[str]) -> list[str]:
        keep, skip = [], {"--draft-mode", "--mtp", "--online-head", "--spec-policy"}
        it = iter(cmd[2:])
        for tok in it:
            if tok in skip:
                next(it)
            else:
                keep.append(tok)
        return keep

    assert len({tuple(shared(c)) for c in cmds.values()}) == 1
    assert "--sync" in cmds["none"] and "/h/tv" in cmds["rs_tv_online_ce"]
    assert cmds["rs_tv_online_tv"][-3:-1] == ["--online-head", "e2e_tv"]
    policy = {n: c[c.index("--spec-policy") + 1] for n, c in cmds.items()}
    assert policy.pop("rs_tv_auto") == "auto" and set(policy.values()) == {"fixed"}
    defaults = set(args.configs.split(","))
    assert "rs_tv_auto" not in defaults and set(policy) == defaults
