"""Inert `torchvision` for importing SGLang's modules on a CPU-only torch (bebop tests only).

engine_sources copies this file to <cache>/shims/torchvision/__init__.py; every attribute
and submodule resolves to an inert placeholder. Importing it under its own name does
nothing (the import hook installs only when the module *is* `torchvision`).
"""

import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+bebop.stub"


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __mro_entries__(self, bases):
        return (object,)


def _getattr(name):
    if name == "InterpolationMode":
        return InterpolationMode
    if name.startswith("__"):
        raise AttributeError(name)
    return _Inert()


__getattr__ = _getattr


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _getattr
        return module

    def exec_module(self, module):
        pass


if __name__ == "torchvision":
    sys.meta_path.insert(0, _Finder())
