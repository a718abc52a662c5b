"""Fixtures of the client tests: a real Bebop server on a tiny random model."""

from __future__ import annotations

import pytest
from bebop_client import RolloutClient


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    from bebop_spec.testing import make_tiny_model

    root = tmp_path_factory.mktemp("client")
    return [make_tiny_model(root / f"m{i}", vocab_size=64, seed=20 + i) for i in range(2)], root


@pytest.fixture
def real(real_models, tmp_path):
    """A fresh server on m0 per test: weight pushes and version labels never leak between
    tests, so each passes alone and in any order. Fixed γ: these tests pin seeded
    reproducibility and per-position counters, which under the auto policy also depend on
    the measured step timings that choose γ_t."""
    from bebop_spec.server.testing import serve_model

    models, _ = real_models
    with (
        serve_model(str(models[0]), str(models[0] / "mtp"), engine={"spec_policy": "fixed"}) as (
            srv,
            state,
        ),  # fmt: skip
        RolloutClient(srv.url) as client,
    ):
        yield client, state, models, tmp_path
