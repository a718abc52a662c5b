"""Backend registry: name -> implementation, imported lazily (vllm / sglang are optional)."""

from __future__ import annotations

import importlib

from bebop_spec.backends.base import ServingBackend
from bebop_spec.engine.config import EngineConfig

BACKENDS: dict[str, str] = {
    "embedded": "bebop_spec.backends.embedded:EmbeddedBackend",
    "vllm": "bebop_spec.backends.vllm:VLLMBackend",  # needs vllm (+ a GPU)
    "sglang": "bebop_spec.backends.sglang:SGLangBackend",  # needs sglang (+ a GPU)
}


def create_backend(name: str, config: EngineConfig) -> ServingBackend:
    """Build (and load) the engine registered as `name`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    module, _, attr = BACKENDS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(config)
