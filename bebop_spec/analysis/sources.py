"""Inputs of `bebop analyze`: per-position JSONL records, or a series of /metrics scrapes.

Records (one JSON object per line):  {"entropy": 1.3, "accepted": true, "mode": "rs", "task": "math"}
Scrapes: a directory of Prometheus text files (one scrape each, read in name order; the
directory name is the task), a single text file, or a JSONL of
{"text": "<scrape>", "task"?: str, "mode"?: str, "server"?: str}. Counters are cumulative:
a series is summed over its increments, and a counter that goes down (server restart)
starts a new run.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bebop_spec.analysis.fit import Bucket, bucket_midpoint

VERIFIED = "spec_decode_verified_tokens_by_entropy"
ACCEPTED = "spec_decode_accepted_tokens_by_entropy"
MODE_INFO = "spec_decode_draft_mode_info"
SCRAPE_SUFFIXES = (".txt", ".prom", ".metrics")


@dataclass
class Records:
    """Per-position data of one (mode, task) group."""

    entropies: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)


@dataclass
class Scrape:
    """The acceptance-by-entropy counters of one scrape: {bucket label: (verified, accepted)}."""

    counts: dict[str, tuple[float, float]]
    mode: str
    task: str | None = None
    server: str = ""


def read_records(path: Path) -> dict[tuple[str, str | None], Records]:
    groups: dict[tuple[str, str | None], Records] = defaultdict(Records)
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            h, ok = float(rec["entropy"]), bool(rec["accepted"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{i}: expected {{entropy, accepted, mode, task?}}: {exc}"
            ) from exc
        g = groups[(str(rec.get("mode") or "unknown"), rec.get("task"))]
        g.entropies.append(h)
        g.accepted.append(ok)
    return dict(groups)


def parse_scrape(text: str, task: str | None = None, mode: str | None = None,
                 server: str = "") -> Scrape:  # fmt: skip
    """One /metrics text -> Scrape (counters summed over other labels, e.g. model_name)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    found_mode = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removesuffix("_total")
            if name.endswith(VERIFIED) or name.endswith(ACCEPTED):
                counts[s.labels["entropy_bucket"]][0 if name.endswith(VERIFIED) else 1] += s.value
            elif name.endswith(MODE_INFO) and s.value:
                found_mode = s.labels.get("draft_mode")
    return Scrape({k: (v[0], v[1]) for k, v in counts.items()}, mode or found_mode or "unknown",
                  task, server)  # fmt: skip


def read_scrapes(path: Path) -> list[Scrape]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SCRAPE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no scrape files ({', '.join(SCRAPE_SUFFIXES)})")
        return [parse_scrape(p.read_text(), task=path.name) for p in files]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec.get("text", rec.get("metrics"))
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i}: expected {{text: <scrape>, task?, mode?, server?}}")
            out.append(
                parse_scrape(text, rec.get("task"), rec.get("mode"), str(rec.get("server", "")))
            )
        return out
    return [parse_scrape(path.read_text())]


def kind_of(path: Path) -> str:
    """ "records" or "metrics", from the content."""
    if path.is_dir() or path.suffix != ".jsonl":
        return "metrics"
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            return "records" if isinstance(rec, dict) and "entropy" in rec else "metrics"
    raise ValueError(f"{path} is empty")


def accumulate(values: Iterable[float]) -> float:
    """Total of a cumulative counter series, counting a drop as a restart from zero."""
    total, prev = 0.0, 0.0
    for v in values:
        total += v - prev if v >= prev else v
        prev = v
    return total


def scrape_buckets(scrapes: list[Scrape]) -> dict[tuple[str, str | None], list[Bucket]]:
    """Scrapes -> {(mode, task): buckets}, each server's series accumulated, then summed."""
    series: dict[tuple, list[Scrape]] = defaultdict(list)
    for s in scrapes:
        series[(s.mode, s.task, s.server)].append(s)
    totals: dict[tuple[str, str | None], dict[str, list[float]]] = defaultdict(dict)
    for (mode, task, _), runs in series.items():
        labels = sorted({b for s in runs for b in s.counts})
        for label in labels:
            n = accumulate(s.counts.get(label, (0.0, 0.0))[0] for s in runs)
            a = accumulate(s.counts.get(label, (0.0, 0.0))[1] for s in runs)
            acc = totals[(mode, task)].setdefault(label, [0.0, 0.0])
            acc[0] += n
            acc[1] += a
    return {key: _buckets(counts) for key, counts in totals.items()}


def _buckets(counts: dict[str, list[float]]) -> list[Bucket]:
    edges = []
    for label, (n, a) in counts.items():
        lo_text, _, hi_text = label.partition("-")
        edges.append((float(lo_text), math.inf if hi_text == "inf" else float(hi_text), n, a))
    edges.sort()
    finite = [hi - lo for lo, hi, _, _ in edges if math.isfinite(hi)]
    open_width = finite[-1] if finite else 1.0
    return [
        Bucket(lo, hi, int(n), int(a), bucket_midpoint(lo, hi, open_width))
        for lo, hi, n, a in edges
    ]
