"""Entropy-vs-acceptance analysis (numpy only; matplotlib for plots): fits, bucket tables,
and the rejection-sampling vs greedy-drafting decision. CLI: `bebop analyze`."""

from bebop_spec.analysis.fit import (
    DEFAULT_EDGES,
    Bucket,
    Fit,
    bucket_table,
    fit_acceptance_vs_entropy,
    fit_buckets,
)
from bebop_spec.analysis.modes import (
    acceptance_rs,
    acceptance_to,
    crossover_entropy,
    decide,
    expected_accepted_length,
    rs_beats_to,
    total_variation,
)

__all__ = [
    "DEFAULT_EDGES",
    "Bucket",
    "Fit",
    "acceptance_rs",
    "acceptance_to",
    "bucket_table",
    "crossover_entropy",
    "decide",
    "expected_accepted_length",
    "fit_acceptance_vs_entropy",
    "fit_buckets",
    "rs_beats_to",
    "total_variation",
]
