"""Exceptions shared by the engine, the server and the tools."""


class BebopError(Exception):
    """Base class."""


class InvalidRequest(BebopError, ValueError):
    """A client mistake (bad parameter, prompt too long, token id out of range)."""


class EngineOverloaded(BebopError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class WeightUpdateError(BebopError, ValueError):
    """A weight update was rejected before anything was swapped; old weights keep serving."""


class ModelLoadError(BebopError, ValueError):
    """A model directory is missing files or holds mis-shaped tensors."""


class BackendUnsupported(BebopError):
    """The serving backend cannot do this (HTTP 501)."""
