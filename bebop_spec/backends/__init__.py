"""Serving backends: the contract (base.py), the registry, and the implementations
(embedded.py; the remote template remote.py, with remote_model.py and remote_requests.py,
under vllm.py / sglang.py)."""

from bebop_spec.backends.base import ServingBackend
from bebop_spec.backends.registry import BACKENDS, create_backend

__all__ = ["BACKENDS", "ServingBackend", "create_backend"]
