"""`bebop patch vllm|sglang`: apply Bebop's patches to an installed engine, all or nothing.

    bebop patch vllm --check                 # exit 0 iff the patches apply (or are applied)
    bebop patch vllm                         # apply (idempotent)
    bebop patch sglang --revert              # restore the pristine files
    bebop patch vllm --site-packages DIR     # an engine tree somewhere else (e.g. an unpacked wheel)

The patch set for an engine is `patches/<engine>-<version>/*.patch` (in the wheel:
`bebop_spec/_patches/`), unified diffs against the installed package tree (paths
`a/vllm/...`), applied in file-name order. The tree's state is read from the files
themselves: *clean* when every patch applies forward, *applied* when every patch applies in
reverse, anything else is a conflict and nothing is touched. Writing is a transaction: all
new contents are computed in memory first, every target is checked for write access, then
files are replaced one by one and restored from the in-memory originals if any write fails.

Exit codes: 0 ok, 1 conflict / partial tree, 2 engine missing or wrong version,
3 not writable (or a write failed and was rolled back).
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bebop_spec.patching.unidiff import FilePatch, PatchError, parse_unified_diff, patch_text

PINNED = {"vllm": "0.33.0", "sglang": "0.5.23"}
EXIT_OK, EXIT_CONFLICT, EXIT_VERSION, EXIT_WRITE = 0, 1, 2, 3


class PatchingError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class EngineTree:
    engine: str
    root: Path  # the directory holding the `vllm/` or `sglang/` package (site-packages)
    version: str | None


def patches_dir(override: str | None = None) -> Path:
    """Where the patch sets live: --patches-dir, $BEBOP_PATCHES_DIR, else the package's own
    `bebop_spec._patches` (in a checkout a link to <repo>/patches; in a wheel a copy)."""
    for cand in (override, os.environ.get("BEBOP_PATCHES_DIR")):
        if cand:
            return Path(cand)
    return Path(str(importlib.resources.files("bebop_spec._patches")))


def _dist_version(root: Path, engine: str) -> str | None:
    """Version from `<engine>-X.dist-info/METADATA` beside the package, else the package's own."""
    for meta in sorted(root.glob(f"{engine}-*.dist-info/METADATA")):
        m = re.search(r"^Version:\s*(\S+)", meta.read_text(errors="replace"), re.M)
        if m:
            return m.group(1)
    for name in ("version.py", "_version.py"):
        f = root / engine / name
        if f.is_file():
            m = re.search(
                r"""(?:__version__|version)\s*[:=][^'"]*['"]([^'"]+)['"]""", f.read_text()
            )
            if m:
                return m.group(1)
    return None


def find_engine(engine: str, site_packages: str | None = None) -> EngineTree:
    """Locate the engine package without importing it (importing vLLM needs CUDA)."""
    if site_packages:
        root = Path(site_packages)
        if not (root / engine / "__init__.py").is_file():
            raise PatchingError(f"no {engine} package under {root}", EXIT_VERSION)
    else:
        spec = importlib.util.find_spec(engine)
        if spec is None or not spec.submodule_search_locations:
            raise PatchingError(
                f"{engine} is not installed in this Python ({sys.executable}); "
                f"install {engine}=={PINNED[engine]} or pass --site-packages DIR",
                EXIT_VERSION,
            )
        root = Path(list(spec.submodule_search_locations)[0]).parent
    return EngineTree(engine, root, _dist_version(root, engine))


def load_patch_set(engine: str, version: str, base: Path) -> list[tuple[str, list[FilePatch]]]:
    folder = base / f"{engine}-{version}"
    files = sorted(folder.glob("*.patch"))
    if not files:
        raise PatchingError(f"no patches in {folder}", EXIT_VERSION)
    return [(f.name, parse_unified_diff(_read(f) or "")) for f in files]


def _read(path: Path) -> str | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8", newline="") as f:  # keep line endings byte-exact
        return f.read()


def plan(tree: EngineTree, patch_set, reverse: bool) -> dict[Path, tuple[str | None, str | None]]:
    """{file: (old content, new content)} after the whole set; PatchError on any mismatch."""
    current: dict[Path, str | None] = {}
    originals: dict[Path, str | None] = {}
    order = reversed(patch_set) if reverse else patch_set
    for name, file_patches in order:
        for fp in reversed(file_patches) if reverse else file_patches:
            path = tree.root / fp.path
            if path not in current:
                originals[path] = current[path] = _read(path)
            try:
                current[path] = patch_text(current[path], fp, reverse)
            except PatchError as e:
                raise PatchError(f"{name}: {fp.path}: {e}") from None
    return {p: (originals[p], current[p]) for p in current}


def tree_state(tree: EngineTree, patch_set) -> tuple[str, str]:
    """('clean' | 'applied' | 'conflict', detail)."""
    try:
        plan(tree, patch_set, reverse=False)
        return "clean", ""
    except PatchError as forward_error:
        try:
            plan(tree, patch_set, reverse=True)
            return "applied", ""
        except PatchError:
            return "conflict", str(forward_error)


def _writable(path: Path) -> bool:
    """os.replace needs the file's directory writable; a new file needs its nearest ancestor."""
    if path.exists():
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return os.access(parent, os.W_OK)


def _check_writable(changes) -> None:
    bad = [str(p) for p in changes if not _writable(p)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PatchingError(
            f"not writable, nothing was changed: {', '.join(bad[:5])}{more}; rerun as the "
            "owner of the environment, or patch a writable copy with --site-packages DIR",
            EXIT_WRITE,
        )


def _write(path: Path, content: str | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".bebop")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(content)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)  # never let a stale bytecode cache shadow the new source


def commit(changes) -> None:
    """Write every new content; on any failure restore what was already written."""
    _check_writable(changes)
    done: list[Path] = []
    try:
        for path, (_old, new) in changes.items():
            _write(path, new)
            done.append(path)
    except OSError as e:
        for path in reversed(done):
            _write(path, changes[path][0])
        raise PatchingError(
            f"writing {path} failed ({e}); rolled back {len(done)} file(s)", EXIT_WRITE
        ) from e


def run(
    engine: str,
    check: bool,
    revert: bool,
    site_packages: str | None,
    patches: str | None,
    out=print,
) -> int:
    tree = find_engine(engine, site_packages)
    pinned = PINNED[engine]
    if tree.version != pinned:
        raise PatchingError(
            f"{engine} {tree.version or '(unknown version)'} at {tree.root} is not the pinned "
            f"{engine}=={pinned}; refusing to patch it",
            EXIT_VERSION,
        )
    patch_set = load_patch_set(engine, pinned, patches_dir(patches))
    state, detail = tree_state(tree, patch_set)
    out(f"{engine} {tree.version} at {tree.root}: {state}")
    if state == "conflict":
        out(f"  patches neither apply nor un-apply cleanly: {detail}")
        out("  the tree was modified by something else; reinstall the engine and retry")
        return EXIT_CONFLICT
    wanted = "clean" if revert else "applied"
    if state == wanted:
        out("  nothing to do" + (" (not patched)" if revert else " (already patched)"))
        return EXIT_OK
    changes = plan(tree, patch_set, reverse=revert)
    verb = "revert" if revert else "patch"
    for path in changes:
        out(f"  {'would ' + verb if check else verb + 'ed'}: {path.relative_to(tree.root)}")
    if check:
        return EXIT_OK
    commit(changes)
    out(
        f"  {len(changes)} file(s) {'reverted' if revert else 'patched'} "
        f"({', '.join(name for name, _ in patch_set)})"
    )
    return EXIT_OK


def main_patch(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bebop patch", description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", choices=sorted(PINNED))
    ap.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 0 iff the operation would succeed",
    )
    ap.add_argument("--revert", action="store_true", help="restore the pristine files")
    ap.add_argument("--site-packages", metavar="DIR", help="directory holding the engine package")
    ap.add_argument(
        "--patches-dir", metavar="DIR", help="where <engine>-<version>/ patch sets live"
    )
    args = ap.parse_args(argv)
    try:
        return run(args.engine, args.check, args.revert, args.site_packages, args.patches_dir)
    except PatchingError as e:
        print(f"bebop patch {args.engine}: {e}", file=sys.stderr)
        return e.code
    except PatchError as e:  # a malformed patch file
        print(f"bebop patch {args.engine}: bad patch: {e}", file=sys.stderr)
        return EXIT_CONFLICT


if __name__ == "__main__":
    raise SystemExit(main_patch(sys.argv[1:]))
