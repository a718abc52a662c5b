"""The vLLM 0.33.0 patch set against the real pinned sources.

Needs the cache built by `python -m bebop_spec.integrations.engine_sources vllm` (about
2-3 minutes once: wheel download, extract, patch, light venv); skipped otherwise.
Guards: the patch set applies cleanly to the pristine tree and only to it, produces
exactly the committed patched tree, reverts byte-exact, byte-compiles, refuses another
version; and the CPU suite (tests/test_integrations_vllm_cpu.py) passes inside a venv
that imports the patched modules with torch on CPU.
"""

from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bebop_spec import patching
from bebop_spec.integrations import engine_sources

pytestmark = pytest.mark.vllm
ENGINE = "vllm"
REPO = Path(__file__).resolve().parent.parent


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"{path} missing: run `python -m bebop_spec.integrations.engine_sources {ENGINE}`"
        )
    return path


@pytest.fixture(scope="module")
def pristine() -> Path:
    return _require(engine_sources.tree(ENGINE, "pristine"))


@pytest.fixture
def mini_tree(pristine, tmp_path) -> Path:
    """The pristine files the patch set touches (plus the package marker and dist-info)."""
    patch_set = patching.load_patch_set(ENGINE, patching.PINNED[ENGINE], patching.patches_dir())
    paths = {fp.path for _, fps in patch_set for fp in fps} | {f"{ENGINE}/__init__.py"}
    for rel in paths:
        src = pristine / rel
        if src.exists():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp_path / rel)
    for dist in pristine.glob(f"{ENGINE}-*.dist-info"):
        shutil.copytree(dist, tmp_path / dist.name)
    return tmp_path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.py")}


def test_patch_set_applies_reverts_and_compiles(mini_tree):
    before = _files(mini_tree)
    args = [ENGINE, "--site-packages", str(mini_tree)]
    assert patching.main_patch([*args, "--check"]) == 0
    assert patching.main_patch(args) == 0
    patched = _files(mini_tree)
    assert patched != before
    for rel in set(patched) - set(before) | {r for r in before if before[r] != patched[r]}:
        py_compile.compile(str(mini_tree / rel), doraise=True)
    assert patching.main_patch(args) == 0 and _files(mini_tree) == patched  # idempotent
    assert patching.main_patch([*args, "--revert"]) == 0
    assert _files(mini_tree) == before


def test_check_refuses_another_version(mini_tree, capsys):
    (meta,) = mini_tree.glob(f"{ENGINE}-*.dist-info/METADATA")
    meta.write_text(
        meta.read_text().replace(f"Version: {patching.PINNED[ENGINE]}", "Version: 0.32.0")
    )
    assert (
        patching.main_patch([ENGINE, "--check", "--site-packages", str(mini_tree)])
        == patching.EXIT_VERSION
    )
    assert "not the pinned" in capsys.readouterr().err


def test_cpu_suite_in_engine_venv():
    """Import the patched modules with torch on CPU and unit-test every patched function."""
    py = _require(engine_sources.venv_python(ENGINE))
    patched = _require(engine_sources.tree(ENGINE, "patched"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(patched), str(REPO)]))
    proc = subprocess.run(
        [
            str(py),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            ENGINE,
            str(REPO / "tests" / f"test_integrations_{ENGINE}_cpu.py"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


@pytest.mark.skipif(sys.platform != "linux", reason="needs a POSIX tree")
def test_patched_tree_matches_the_patch_set(pristine):
    """The cached patched tree is exactly pristine + patches (no stale cache)."""
    patched = _require(engine_sources.tree(ENGINE, "patched"))
    tree = patching.EngineTree(ENGINE, pristine, patching.PINNED[ENGINE])
    patch_set = patching.load_patch_set(ENGINE, patching.PINNED[ENGINE], patching.patches_dir())
    for path, (_old, new) in patching.plan(tree, patch_set, reverse=False).items():
        assert (patched / path.relative_to(pristine)).read_text() == new
