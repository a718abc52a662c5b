"""The embedded engine: continuous batching with MTP speculative decoding."""

from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.outputs import CompletionOutput, RequestOutput, SpecStats, StepStats

__all__ = ["CompletionOutput", "EngineConfig", "RequestOutput", "SpecStats", "StepStats"]
