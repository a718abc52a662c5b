"""Command-line options generated from the config dataclasses, so that each option's name,
type, default and help is declared once, on the dataclass field.

    add_config_args(parser, EngineConfig, ["max_num_seqs", "dtype"], choices={"dtype": DTYPES})
    EngineConfig(model=..., **config_kwargs(args, ["max_num_seqs", "dtype"]))

A field `max_num_seqs: int = 64  # most rows per step` becomes `--max-num-seqs INT`
(default 64, help "most rows per step", read from the field's trailing comment). Booleans
become `--flag` (default False) or `--no-flag` (default True; `enable_x` also takes
`--no-x`); `T | None` accepts T.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*([^=#]+?)(?:\s*=\s*[^#]*)?(?:#\s*(.*))?$")


@functools.cache
def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation text, trailing comment)} from the dataclass's source."""
    out: dict[str, tuple[str, str]] = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m and m.group(1) in cls.__dataclass_fields__:
            out[m.group(1)] = (m.group(2).strip(), (m.group(3) or "").strip())
    return out


def _parser_type(annotation: str) -> type | None:
    """int / float / str for `int`, `float | None`, ...; None for bool."""
    base = [t.strip() for t in annotation.split("|") if t.strip() != "None"][0]
    if base == "bool":
        return None
    if base not in _TYPES:
        raise TypeError(f"no command-line type for annotation {annotation!r}")
    return _TYPES[base]


def add_config_args(parser: argparse.ArgumentParser | Any, cls: type, names: list[str], *,
                    choices: dict[str, Any] | None = None,
                    help: dict[str, str] | None = None) -> None:  # fmt: skip
    """One option per field in `names` (see the module docstring); `help` overrides a
    field's comment where the command line needs more words."""
    docs = field_docs(cls)
    for name in names:
        f = cls.__dataclass_fields__[name]
        annotation, comment = docs[name]
        text = (help or {}).get(name, comment) or None
        flag = "--" + name.replace("_", "-")
        kind = _parser_type(annotation)
        if kind is None:
            if f.default is not True:
                parser.add_argument(flag, dest=name, action="store_true", help=text)
                continue
            flags = [f"--no-{name.replace('_', '-')}"]
            if name.startswith("enable_"):  # --no-prefix-caching for enable_prefix_caching
                flags.append(f"--no-{name[len('enable_') :].replace('_', '-')}")
            parser.add_argument(*flags, dest=name, action="store_false",
                                help=f"turn off: {text}" if text else None)  # fmt: skip
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        parser.add_argument(flag, dest=name, type=kind, default=default, help=text,
                            choices=(choices or {}).get(name))  # fmt: skip


def config_kwargs(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The parsed values of the fields `add_config_args` declared for `names`."""
    return {k: getattr(args, k) for k in names}
