"""What a remote backend knows of its model without loading it: read from the checkpoint.

A remote engine (vLLM, SGLang) loads the weights in its own processes; the server still
needs the target's config (vocabulary, EOS ids, context length) and the names / shapes /
dtypes a trainer must send for each weight selector. Both come from the checkpoint's files:
`config.json` and the safetensors headers (no tensor is read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bebop_spec.engine.config import WEIGHT_SELECTORS, WeightSelector
from bebop_spec.models.checkpoint import Checkpoint, is_mtp_name

# copies of the target's embedding / LM head that exported head directories carry
SHARED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def checkpoint_spec(directory: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return Checkpoint(directory).spec()


def weight_spec_of(
    model_dir: str | Path, mtp_dir: str | Path | None, num_hidden_layers: int, selector: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensors a trainer sends for `selector`, in checkpoint (Hugging Face) names."""
    if selector not in WEIGHT_SELECTORS:
        raise ValueError(f"selector={selector!r}: expected one of {WEIGHT_SELECTORS}")
    target = checkpoint_spec(model_dir)
    draft = {k: v for k, v in target.items() if is_mtp_name(k, num_hidden_layers)}
    target = {k: v for k, v in target.items() if k not in draft}
    if mtp_dir is not None:
        draft = {k: v for k, v in checkpoint_spec(mtp_dir).items() if k not in SHARED_NAMES}
    parts = {WeightSelector.TARGET: target, WeightSelector.DRAFT: draft}
    return {**parts, WeightSelector.ALL: {**target, **draft}}[selector]


def read_model_config(model_dir: str | Path) -> Any:
    """bebop's ModelConfig of the target, or the raw config.json as attributes."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    try:
        from bebop_spec.models.config import ModelConfig

        return ModelConfig.from_hf(hf)
    except (ValueError, KeyError, TypeError):  # a family the embedded engine does not run
        from types import SimpleNamespace

        eos = hf.get("eos_token_id")
        fields = {
            **hf,
            "eos_token_ids": [] if eos is None else (eos if isinstance(eos, list) else [eos]),
            "max_position_embeddings": hf.get("max_position_embeddings", 32768),
        }
        return SimpleNamespace(**fields)
