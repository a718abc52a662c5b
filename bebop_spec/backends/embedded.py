"""The embedded engine as a serving backend: bebop_spec's own AsyncEngine (engine layer),
declared an implementation of the contract here, one layer up."""

from __future__ import annotations

from bebop_spec.backends.base import ServingBackend
from bebop_spec.engine.async_engine import AsyncEngine


class EmbeddedBackend(AsyncEngine, ServingBackend):
    """AsyncEngine implements every member of ServingBackend; nothing is added."""
