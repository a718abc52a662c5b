"""Prometheus text exposition -> numbers, and the speculative-decoding view of them.

    m = parse_metrics(httpx.get(url + "/metrics").text)
    m.acceptance_rate, m.per_position_acceptance, m.acceptance_by_entropy, m.weight_version
    window = m.delta(earlier)        # counters over the interval between two scrapes

Names follow the server's vLLM-shaped metrics with a `bebop:` prefix (`vllm:` scrapes work
for the shared spec_decode_* counters). A small parser of the text format (HELP/TYPE lines,
labels with \\ \" \\n escapes, +Inf/-Inf/NaN, optional timestamps) keeps prometheus_client
optional.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+(\S+))?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
CUMULATIVE = ("counter", "histogram", "summary")


@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class EntropyBucket:
    """Verified draft positions whose target entropy (nats) lies in [lo, hi)."""

    label: str
    lo: float
    hi: float
    verified: float
    accepted: float

    @property
    def rate(self) -> float | None:
        return self.accepted / self.verified if self.verified else None


def _value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(text)


def _labels(text: str | None, line: str) -> dict[str, str]:
    if not text:
        return {}
    body, pos, out = text[1:-1], 0, {}
    while pos < len(body):
        m = _LABEL.match(body, pos)
        if m is None:
            if body[pos:].strip(" ,"):
                raise ValueError(f"malformed labels in metrics line: {line!r}")
            break
        out[m.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return out


def iter_samples(text: str) -> Iterator[tuple[str, str, dict[str, str] | float]]:
    """("type", family, kind) for TYPE lines and ("sample", name, MetricSample) for samples."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                yield "type", parts[2], parts[3].strip()
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"malformed metrics line: {raw!r}")
        name, labels, value = m.group(1), _labels(m.group(2), raw), _value(m.group(3))
        yield "sample", name, MetricSample(name, labels, value)


def parse_metrics(text: str, prefix: str | None = None) -> Metrics:
    """Parse Prometheus text; `prefix` ("bebop:", "vllm:") is guessed when not given."""
    samples, types = [], {}
    for kind, name, item in iter_samples(text):
        if kind == "type":
            types[name] = item
        else:
            samples.append(item)
    if prefix is None:
        names = {s.name for s in samples}
        prefix = next((p for p in ("bebop:", "vllm:", "sglang:")
                       if any(n.startswith(p) for n in names)), "")  # fmt: skip
    return Metrics(samples, types, prefix)


@dataclass
class Metrics:
    samples: list[MetricSample]
    types: dict[str, str] = field(default_factory=dict)
    prefix: str = "bebop:"

    # ------------------------------------------------------------- lookups
    def find(self, name: str, **labels: str) -> list[MetricSample]:
        """Samples named `prefix + name` (or with `_total`) whose labels include `labels`."""
        full = self.prefix + name
        wanted = (full, full + "_total")
        return [s for s in self.samples if s.name in wanted
                and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip

    def value(self, name: str, default: float = 0.0, **labels: str) -> float:
        """Sum of the matching samples (e.g. over model_name), or `default` if none."""
        hits = self.find(name, **labels)
        return sum(s.value for s in hits) if hits else default

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.find(name):
            if label in s.labels:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
        return out

    def _kind(self, sample_name: str) -> str:
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            if suffix and not sample_name.endswith(suffix):
                continue
            family = sample_name[: len(sample_name) - len(suffix)] if suffix else sample_name
            if family in self.types:
                return self.types[family]
        return "counter" if sample_name.endswith("_total") else "untyped"

    # ---------------------------------------------------- speculative decoding
    @property
    def num_drafts(self) -> float:
        return self.value("spec_decode_num_drafts")

    @property
    def num_draft_tokens(self) -> float:
        return self.value("spec_decode_num_draft_tokens")

    @property
    def num_accepted_tokens(self) -> float:
        return self.value("spec_decode_num_accepted_tokens")

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens."""
        n = self.num_draft_tokens
        return self.num_accepted_tokens / n if n else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per verification step = 1 + accepted drafts per step (vLLM's definition)."""
        n = self.num_drafts
        return 1.0 + self.num_accepted_tokens / n if n else None

    @property
    def per_position_acceptance(self) -> list[float]:
        """Fraction of steps whose draft j (0-based) was accepted, j = 0..γ-1."""
        n = self.num_drafts
        per = self.by_label("spec_decode_num_accepted_tokens_per_pos", "position")
        if not n or not per:
            return []
        return [per.get(str(j), 0.0) / n for j in range(max(int(p) for p in per) + 1)]

    @property
    def acceptance_by_entropy(self) -> list[EntropyBucket]:
        """Acceptance per target-entropy bucket, by increasing entropy."""
        verified = self.by_label("spec_decode_verified_tokens_by_entropy", "entropy_bucket")
        accepted = self.by_label("spec_decode_accepted_tokens_by_entropy", "entropy_bucket")
        out = []
        for label, n in verified.items():
            lo, _, hi = label.partition("-")
            out.append(EntropyBucket(label, _value(lo), _value(hi), n, accepted.get(label, 0.0)))
        return sorted(out, key=lambda b: b.lo)

    @property
    def entropy_histogram(self) -> list[tuple[float, float]]:
        """[(upper edge `le`, cumulative count)] of the verified positions' target entropy."""
        buckets = self.by_label("spec_decode_target_entropy_bucket", "le")
        return sorted((_value(le), c) for le, c in buckets.items())

    @property
    def mean_entropy(self) -> float | None:
        n = self.value("spec_decode_target_entropy_count")
        return self.value("spec_decode_target_entropy_sum") / n if n else None

    @property
    def draft_mode(self) -> str | None:
        modes = [s.labels.get("draft_mode") for s in self.find("spec_decode_draft_mode_info")
                 if s.value]  # fmt: skip
        return modes[0] if modes else None

    # --------------------------------------------------------------- serving
    @property
    def weight_version(self) -> int | None:
        """The server's update counter (+1 per applied weight update)."""
        hits = self.find("weight_version")
        return int(hits[0].value) if hits else None

    @property
    def weight_version_label(self) -> str | None:
        labels = [s.labels.get("version") for s in self.find("weight_version_info") if s.value]
        return labels[0] if labels else None

    @property
    def num_requests_running(self) -> float:
        return self.value("num_requests_running")

    @property
    def num_requests_waiting(self) -> float:
        return self.value("num_requests_waiting")

    # ---------------------------------------------------------------- windows
    def delta(self, earlier: Metrics) -> Metrics:
        """Counters and histograms over the interval since `earlier` (a later scrape of the
        same server); gauges keep this scrape's value. A counter that went down was reset
        (server restart): its whole current value counts."""
        before = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in earlier.samples}
        out = []
        for s in self.samples:
            if self._kind(s.name) in CUMULATIVE:
                old = before.get((s.name, tuple(sorted(s.labels.items()))), 0.0)
                out.append(
                    MetricSample(s.name, s.labels, s.value - old if s.value >= old else s.value)
                )
            else:
                out.append(s)
        return Metrics(out, dict(self.types), self.prefix)

    def summary(self) -> dict:
        """The headline numbers as a JSON-ready dict."""
        return {
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_position_acceptance": self.per_position_acceptance,
            "mean_entropy": self.mean_entropy,
            "acceptance_by_entropy": [
                {"bucket": b.label, "verified": b.verified, "accepted": b.accepted, "rate": b.rate}
                for b in self.acceptance_by_entropy
            ],
            "draft_mode": self.draft_mode,
            "weight_version": self.weight_version,
            "weight_version_label": self.weight_version_label,
        }
