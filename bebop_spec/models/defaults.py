"""The product's default model: what `LLM()`, `bebop serve` and the benchmarks load when no
model is given.

    target_dir, head_dir = default_model()   # SmolLM2-135M-Instruct + its shipped Bebop head

The target is SmolLM2-135M-Instruct, converted once from its PyPI package into the cache
(models/default_model.py). The head is the e2e-TV MTP head Bebop trained for it, shipped inside
the package (`bebop_spec/heads/`, ~15 MB) with the recipe that rebuilt it
(`bebop mtp recipe smollm2`, train/recipes.py). The 4.2 M-parameter demo model stays the test
suite's fixture and is reached explicitly (`--model demo`, `bebop_spec.demo.cli.default_model`).
"""

from __future__ import annotations

from pathlib import Path

HEADS_DIR = Path(__file__).resolve().parent.parent / "heads"
DEFAULT_HEAD = HEADS_DIR / "smollm2-135m-instruct"
DEMO = "demo"  # the model name that selects the built-in demo model


def shipped_head() -> Path | None:
    """The shipped head of the default model, or None when this install has none."""
    return DEFAULT_HEAD if (DEFAULT_HEAD / "config.json").is_file() else None


def default_model(progress: bool = True) -> tuple[Path, Path | None]:
    """(target dir, head dir or None): the default model, converted on first use (~1 min)."""
    from bebop_spec.models.default_model import ensure_smollm2

    return ensure_smollm2(progress=progress), shipped_head()


def resolve_model(model: str | None, mtp: str | None, progress: bool = True
                  ) -> tuple[str, str | None]:  # fmt: skip
    """The (model, mtp) a caller asked for: None → the default model and its head; "demo" →
    the built-in demo model and its head (built once, cached); else as given."""
    if model == DEMO:
        from bebop_spec.demo.cli import default_model as demo_model

        target, head = demo_model(progress=progress)
        return str(target), mtp or str(head)
    if model is None:
        target, head = default_model(progress=progress)
        return str(target), mtp or (str(head) if head is not None else None)
    return model, mtp
