"""`bebop analyze`: acceptance vs target entropy, per draft mode and task.

    bebop analyze records.jsonl --plot acc.png --json fit.json   # per-position records
    bebop analyze scrapes/ --plot acc.png                        # a directory of /metrics scrapes
    bebop analyze scrapes.jsonl                                  # {"text": <scrape>, "task": ...}

Prints a bucket table and the least squares line α ≈ a + slope·H for each (mode, task), and
where both rs and to were measured for a task, which mode wins at which entropy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from bebop_spec.analysis.fit import (
    DEFAULT_EDGES,
    Bucket,
    Fit,
    bucket_table,
    check_edges,
    fit_acceptance_vs_entropy,
    fit_buckets,
)
from bebop_spec.analysis.modes import decide
from bebop_spec.analysis.sources import (
    Records,
    kind_of,
    read_records,
    read_scrapes,
    scrape_buckets,
)


@dataclass
class Group:
    mode: str
    task: str | None
    source: str  # "records" | "metrics"
    fit: Fit
    buckets: list[Bucket]

    @property
    def label(self) -> str:
        return self.mode if self.task is None else f"{self.mode}/{self.task}"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "task": self.task, "source": self.source,
                "fit": self.fit.to_dict(), "buckets": [b.to_dict() for b in self.buckets]}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bebop analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path,
                   help="records JSONL, scrape JSONL, scrape directory or scrape text file")  # fmt: skip
    p.add_argument("--edges", default=",".join(str(e) for e in DEFAULT_EDGES),
                   help="entropy bucket edges in nats for records (default: the server's)")  # fmt: skip
    p.add_argument("--json", dest="json_out", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of acceptance vs entropy here")
    p.add_argument("--title", default="Acceptance vs target entropy")
    return p


def record_groups(
    records: dict[tuple[str, str | None], Records], edges: list[float]
) -> list[Group]:
    """Per (mode, task), plus a pooled group per mode when it spans several tasks."""
    pooled: dict[str, Records] = {}
    for (mode, _), r in records.items():
        p = pooled.setdefault(mode, Records())
        p.entropies += r.entropies
        p.accepted += r.accepted
    items = list(records.items())
    for mode, r in pooled.items():
        if sum(1 for (m, _) in records if m == mode) > 1:
            items.append(((mode, "all"), r))
    return [Group(mode, task, "records", fit_acceptance_vs_entropy(r.entropies, r.accepted),
                  bucket_table(r.entropies, r.accepted, edges))
            for (mode, task), r in items]  # fmt: skip


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_group(g: Group, out=None) -> None:
    out, f = out or sys.stdout, g.fit
    print(f"\n== {g.label}  ({g.source}, {f.n} verified positions)", file=out)
    print(f"{'entropy (nats)':>16} {'n':>9} {'accepted':>9} {'rate':>7} {'± s.e.':>7}", file=out)
    for b in g.buckets:
        print(f"{b.label:>16} {b.n:>9} {b.accepted:>9} {_fmt(b.rate if b.n else None):>7} "
              f"{_fmt(b.stderr if b.n else None):>7}", file=out)  # fmt: skip
    print(f"fit: α ≈ {f.line()}   (slope s.e. "
          f"{_fmt(f.slope_stderr)}, r = {_fmt(f.r)})", file=out)  # fmt: skip


def decisions(groups: list[Group]) -> list[dict]:
    by = {(g.task, g.mode): g for g in groups}
    out = []
    for task in dict.fromkeys(g.task for g in groups):
        rs, to = by.get((task, "rs")), by.get((task, "to"))
        if rs and to:
            out.append({"task": task, **decide(rs.fit, to.fit, rs.buckets, to.buckets)})
    return out


def analyze(inputs: list[Path], edges: list[float]) -> list[Group]:
    groups: list[Group] = []
    scrapes = []
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"no such input: {path}")
        if kind_of(path) == "records":
            groups += record_groups(read_records(path), edges)
        else:
            scrapes += read_scrapes(path)
    for (mode, task), buckets in scrape_buckets(scrapes).items():
        if any(b.n for b in buckets):
            groups.append(Group(mode, task, "metrics", fit_buckets(buckets), buckets))
    return groups


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        edges = check_edges([float(e) for e in args.edges.split(",")])
        groups = analyze(args.inputs, edges)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"bebop analyze: {exc}", file=sys.stderr)
        return 2
    if not groups:
        print("bebop analyze: no verified draft positions in the inputs", file=sys.stderr)
        return 1
    for g in groups:
        print_group(g)
    result = {"groups": [g.to_dict() for g in groups], "decisions": decisions(groups)}
    for d in result["decisions"]:
        where = "" if d["task"] is None else f" ({d['task']})"
        print(f"\nrs vs to{where}: {d['summary']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.plot:
        from bebop_spec.analysis.plot import plot_groups

        plot_groups([(g.label, g.fit, g.buckets) for g in groups], args.plot, args.title)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
