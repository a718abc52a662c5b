"""Bebop: MTP speculative decoding with exact rejection sampling for RL rollouts.

from bebop_spec import LLM, SamplingParams
"""

from bebop_spec.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the engine pulls in torch
        from bebop_spec.engine.llm import LLM

        return LLM
    raise AttributeError(name)
