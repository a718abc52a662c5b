"""Python functions from the running interpreter's standard library: the demo's code domain.

Every documented function (or method) becomes one pair: prompt = its signature and docstring,
response = the rest of its body, both dedented so the two concatenate to valid source.

Files are chosen deterministically: held-out files are those whose relative path hashes to
0 mod 10 (independent of the seed, so held-out never leaks into training); the rest are visited
in an order keyed by (seed, path) until the character budget is spent. The corpus therefore
depends on the Python version (recorded in the build's config hash).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

# Tests, IDE code, vendored and generated trees: not representative library code.
SKIP_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
    "turtledemo", "__pycache__", "__phello__", "encodings", "pydoc_data",
}  # fmt: skip
MAX_FUNCTIONS_PER_FILE = 30
PROMPT_PREFIX = "Complete this Python function from {path}:\n\n"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_heldout(rel_path: str) -> bool:
    return _hash(rel_path) % 10 == 0


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the candidate .py files, sorted."""
    root = stdlib_dir() if root is None else root
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # prune (site-packages is huge)
        rel = Path(folder).relative_to(root)
        out += [
            (rel / f).as_posix() for f in files if f.endswith(".py") and not f.startswith("test_")
        ]
    return sorted(out)


def split_function(source_lines: list[str], node: ast.FunctionDef) -> tuple[str, str] | None:
    """(signature + docstring, body) of one documented function, dedented; None if unusable."""
    if ast.get_docstring(node) is None or len(node.body) < 2:
        return None
    doc_end = node.body[0].end_lineno
    text = textwrap.dedent("".join(source_lines[node.lineno - 1 : node.end_lineno]))
    if text[:1].isspace():  # a multi-line string less indented than the def: cannot dedent
        return None
    cut = doc_end - node.lineno + 1
    lines = text.splitlines(keepends=True)
    header, body = "".join(lines[:cut]), "".join(lines[cut:])
    return (header.rstrip("\n"), body.rstrip("\n")) if body.strip() else None


def file_functions(root: Path, rel_path: str, max_chars: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one file, in source order, each at most `max_chars` long."""
    try:
        source = (root / rel_path).read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            split = split_function(lines, node)
            if split and len(split[0]) + len(split[1]) <= max_chars and len(split[1]) >= 20:
                prompt = PROMPT_PREFIX.format(path=rel_path) + split[0]
                pairs.append((prompt, split[1]))
    pairs.sort(key=lambda p: source.find(p[0].split("\n\n", 1)[1]))
    return pairs[:MAX_FUNCTIONS_PER_FILE]


def code_pairs(
    seed: int, heldout: bool, budget_chars: int, max_chars: int, root: Path | None = None
) -> Iterator[tuple[str, str]]:
    """(prompt, response) pairs from train or held-out files until `budget_chars` are used."""
    root = stdlib_dir() if root is None else root
    files = [f for f in stdlib_files(root) if is_heldout(f) == heldout]
    files.sort(key=lambda f: _hash(f"{seed}:{f}"))
    used = 0
    for rel in files:
        for prompt, response in file_functions(root, rel, max_chars):
            if used >= budget_chars:
                return
            used += len(prompt) + len(response)
            yield prompt, response
