"""Entropy-acceptance analysis: the least squares fit recovers a known slope, bucket
counts and fits agree with the raw records, the RS-vs-TO rule matches the acceptance
formulas, and `bebop analyze` reads records JSONL and real server /metrics scrapes."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from bebop_spec.analysis import (
    acceptance_rs,
    acceptance_to,
    bucket_table,
    crossover_entropy,
    expected_accepted_length,
    fit_acceptance_vs_entropy,
    fit_buckets,
    rs_beats_to,
    total_variation,
)
from bebop_spec.analysis.cli import main
from bebop_spec.analysis.sources import accumulate

TRUTH = {"rs": (0.85, -0.03), "to": (0.90, -0.25)}  # (a, slope): α = a + slope·H


def synthetic(mode: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """H ~ U(0, 3) nats, accepted ~ Bernoulli(a + slope·H)."""
    a, slope = TRUTH[mode]
    rng = np.random.default_rng(seed)
    h = rng.uniform(0.0, 3.0, n)
    return h, rng.random(n) < a + slope * h


def test_fit_recovers_known_slope():
    """N = 20000 Bernoulli records: the slope and intercept land within 4 standard errors
    of the truth (s.e. of the slope ≈ 0.004 here, so also within 0.02 absolute)."""
    h, acc = synthetic("to", 20_000, 0)
    fit = fit_acceptance_vs_entropy(h, acc)
    assert fit.n == 20_000 and fit.slope_stderr < 0.006
    assert abs(fit.slope - TRUTH["to"][1]) < 4 * fit.slope_stderr
    assert abs(fit.intercept - TRUTH["to"][0]) < 0.02
    assert -0.6 < fit.r < -0.3  # a strong, negative dependence
    assert fit.predict(1.0) == pytest.approx(fit.intercept + fit.slope)


def test_buckets_and_bucket_fit_agree_with_records():
    """Bucket counts partition the records; each rate is that bucket's mean; the fit on
    bucket counts (weighted by n) gives the raw fit's slope within 0.01."""
    h, acc = synthetic("to", 20_000, 1)
    table = bucket_table(h, acc)
    assert sum(b.n for b in table) == h.size and sum(b.accepted for b in table) == acc.sum()
    b = table[3]  # [1.0, 1.5)
    sel = (h >= 1.0) & (h < 1.5)
    assert b.n == sel.sum() and b.rate == pytest.approx(acc[sel].mean())
    assert table[-1].n == 0 and math.isinf(table[-1].hi)
    raw, binned = fit_acceptance_vs_entropy(h, acc), fit_buckets(table)
    assert abs(raw.slope - binned.slope) < 0.01 and binned.n == raw.n
    with pytest.raises(ValueError):
        fit_acceptance_vs_entropy([0.1, 0.2], [True])


def test_rs_vs_to_rule_matches_acceptance_formulas():
    """On random (p, q): α_RS = 1 − TV; RS beats TO exactly where TV < 1 − p(argmax q),
    i.e. where α_RS > α_TO; with a one-hot q both modes accept alike."""
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.full(16, 0.3), size=500)
    q = rng.dirichlet(np.full(16, 0.3), size=500)
    np.testing.assert_allclose(acceptance_rs(p, q), 1 - total_variation(p, q), atol=1e-12)
    np.testing.assert_array_equal(rs_beats_to(p, q), acceptance_rs(p, q) > acceptance_to(p, q))
    assert 0 < rs_beats_to(p, q).mean() < 1  # both outcomes occur
    onehot = np.eye(16)[q.argmax(-1)]
    np.testing.assert_allclose(acceptance_rs(p, onehot), acceptance_to(p, onehot), atol=1e-12)
    assert expected_accepted_length([0.8, 0.5, 0.5]) == pytest.approx(0.8 + 0.4 + 0.2)


def write_records(path, n: int = 6000) -> None:
    with path.open("w") as f:
        for mode in ("rs", "to"):
            for task, seed in (("math", 3), ("code", 4)):
                h, acc = synthetic(mode, n, seed + (mode == "to") * 10)
                for x, y in zip(h, acc, strict=True):
                    f.write(json.dumps({"entropy": float(x), "accepted": bool(y), "mode": mode,
                                        "task": task}) + "\n")  # fmt: skip


def test_cli_on_records(tmp_path, capsys):
    """`bebop analyze records.jsonl`: one group per (mode, task) plus pooled per mode,
    slopes near the truth, rs/to crossover near the true lines' (0.05/0.22 ≈ 0.23 nats),
    a bucket table printed, JSON and a PNG written."""
    rec = tmp_path / "records.jsonl"
    write_records(rec)
    out, png = tmp_path / "o" / "fit.json", tmp_path / "o" / "acc.png"
    assert main([str(rec), "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    groups = {(g["mode"], g["task"]): g for g in res["groups"]}
    assert set(groups) == {(m, t) for m in ("rs", "to") for t in ("math", "code", "all")}
    for (mode, _), g in groups.items():
        assert abs(g["fit"]["slope"] - TRUTH[mode][1]) < 5 * g["fit"]["slope_stderr"]
    truth_x = (TRUTH["to"][0] - TRUTH["rs"][0]) / (TRUTH["rs"][1] - TRUTH["to"][1])
    pooled = next(d for d in res["decisions"] if d["task"] == "all")
    assert abs(pooled["crossover_entropy"] - truth_x) < 0.15
    assert pooled["per_bucket"][-1]["winner"] == "rs"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "== to/math" in printed and "2.00-3.00" in printed and "rs vs to (all)" in printed


def server_scrape(metrics, mode: str, h: np.ndarray, acc: np.ndarray) -> str:
    from bebop_spec.engine.outputs import StepStats

    metrics.observe_step(StepStats(draft_mode=mode, verified_entropies=h.tolist(),
                                   verified_accepted=acc.tolist()))  # fmt: skip
    return metrics.render().decode()


def test_cli_on_server_metrics_scrapes(tmp_path, capsys):
    """A series of real ServerMetrics scrapes per mode (one rs series with a restart) -> the
    per-bucket counts add up across increments and restarts, and the fit on bucket
    midpoints recovers the slope (within 0.03 for N = 30000)."""
    from bebop_spec.server.metrics import ServerMetrics

    def engine(mode: str):
        return SimpleNamespace(num_running=0, num_waiting=0, version=0, weight_version="default",
                               config=SimpleNamespace(draft_mode=mode, draft_mode_name=mode),
                               add_observer=lambda fn: None)  # fmt: skip

    lines = []
    for mode, seed in (("rs", 5), ("to", 6)):
        h, acc = synthetic(mode, 30_000, seed)
        chunks = np.array_split(np.arange(h.size), 3)
        m = ServerMetrics(engine(mode), "tiny")
        for i, idx in enumerate(chunks):
            if mode == "rs" and i == 2:
                m = ServerMetrics(engine(mode), "tiny")  # server restart: counters reset
            lines.append({"text": server_scrape(m, mode, h[idx], acc[idx]), "task": "t"})
    (tmp_path / "scrapes.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    scrape_dir = tmp_path / "one"
    scrape_dir.mkdir()
    (scrape_dir / "0001.prom").write_text(lines[-1]["text"])
    out = tmp_path / "fit.json"
    assert main([str(tmp_path / "scrapes.jsonl"), str(scrape_dir), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    groups = {(g["mode"], g["task"]): g for g in res["groups"]}
    for mode in ("rs", "to"):
        g = groups[(mode, "t")]
        assert sum(b["n"] for b in g["buckets"]) == 30_000
        assert abs(g["fit"]["slope"] - TRUTH[mode][1]) < 0.03
    assert sum(b["n"] for b in groups[("to", "one")]["buckets"]) == 30_000
    assert res["decisions"][0]["task"] == "t"
    assert accumulate([5, 9, 2, 4]) == 13  # 5 + 4, restart, 2 + 2
    capsys.readouterr()


def test_cli_reports_bad_input(tmp_path, capsys):
    """Malformed records and missing inputs are reported with exit code 2, not a traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"entropy": 1.0, "mode": "rs"}\n')
    assert main([str(bad)]) == 2
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_crossover_of_parallel_lines_is_none():
    """Parallel fitted lines never cross; the decision then names one mode everywhere."""
    from bebop_spec.analysis import Fit, decide

    a, b = Fit(-0.1, 0.8, -0.3, 100), Fit(-0.1, 0.7, -0.3, 100)
    assert crossover_entropy(a, b) is None
    assert decide(a, b)["summary"].startswith("rs wins at every entropy")
