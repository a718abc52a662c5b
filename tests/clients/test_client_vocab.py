"""The client's copy of the server's wire vocabularies stays the server's."""

from __future__ import annotations

from bebop_client import vocab

from bebop_spec.engine.config import PauseMode, WeightSelector


def test_client_vocabularies_equal_the_servers():
    """Invariant: bebop_client.vocab (the client cannot import the server) lists exactly the
    weight selectors and engine pause modes the server accepts, as the same strings."""
    assert set(vocab.WeightSelector) == set(WeightSelector)
    assert set(vocab.PauseMode) == set(PauseMode)
    assert vocab.PauseMode.IN_PLACE == "in_place" and f"{vocab.WeightSelector.ALL}" == "all"
