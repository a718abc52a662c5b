"""Headless plots: one place that picks matplotlib's file-only backend.

    from bebop_spec.plotting import pyplot
    plt = pyplot()          # matplotlib.pyplot on the Agg backend (no display needed)

matplotlib is imported lazily (STYLE rule: optional backends load on use), so importing a
module that plots costs nothing until it does.
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """matplotlib.pyplot with the Agg backend selected (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
