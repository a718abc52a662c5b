"""The vLLM 0.33.0 / SGLang 0.5.23 patch sets against the real pinned sources.

Needs the cache built by `python -m tools.engine_sources vllm sglang`
(about 2 minutes per engine: wheel download, extract, patch, light venv); skipped otherwise.
Guards: each patch set applies cleanly to the pristine tree, is idempotent, reverts
byte-exact, byte-compiles, refuses another version, matches the cached patched tree; and
the CPU suite (tests/backends/test_integrations_<engine>_cpu.py) passes inside a venv that imports
the patched modules with torch on CPU.
"""

from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest

from bebop_spec import patching
from tools import engine_sources

REPO = Path(__file__).resolve().parents[2]
ENGINES = [
    pytest.param("vllm", marks=pytest.mark.vllm),
    pytest.param("sglang", marks=pytest.mark.sglang),
]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


def _require(path: Path, engine: str) -> Path:
    if not path.exists():
        pytest.skip(f"{path} missing: run `python -m tools.engine_sources {engine}`")
    return path


@pytest.fixture(scope="module")
def pristine(engine) -> Path:
    return _require(engine_sources.tree(engine, "pristine"), engine)


def _patch_set(engine: str):
    return patching.load_patch_set(engine, patching.PINNED[engine], patching.patches_dir())


@pytest.fixture
def mini_tree(engine, pristine, tmp_path) -> Path:
    """The pristine files the patch set touches, the package marker and the dist-info."""
    paths = {fp.path for _, fps in _patch_set(engine) for fp in fps} | {f"{engine}/__init__.py"}
    for rel in paths:
        if (pristine / rel).exists():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pristine / rel, tmp_path / rel)
    for dist in pristine.glob(f"{engine}-*.dist-info"):
        shutil.copytree(dist, tmp_path / dist.name)
    return tmp_path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.py")}


def test_patch_set_applies_reverts_and_compiles(engine, mini_tree):
    """On the pinned pristine files the patch set checks, applies (changed files byte-compile),
    reapplies as a no-op and reverts to the original bytes."""
    before = _files(mini_tree)
    args = [engine, "--site-packages", str(mini_tree)]
    assert patching.main_patch([*args, "--check"]) == 0
    assert patching.main_patch(args) == 0
    patched = _files(mini_tree)
    changed = {r for r in patched if before.get(r) != patched[r]}
    assert changed
    for rel in changed:
        py_compile.compile(str(mini_tree / rel), doraise=True)
    assert patching.main_patch(args) == 0 and _files(mini_tree) == patched  # idempotent
    assert patching.main_patch([*args, "--revert"]) == 0
    assert _files(mini_tree) == before


def test_check_refuses_another_version(engine, mini_tree, capsys):
    """--check on a tree whose dist-info names another version exits EXIT_VERSION, saying it is
    not the pinned one."""
    (meta,) = mini_tree.glob(f"{engine}-*.dist-info/METADATA")
    pinned = f"Version: {patching.PINNED[engine]}"
    meta.write_text(meta.read_text().replace(pinned, "Version: 0.0.1"))
    rc = patching.main_patch([engine, "--check", "--site-packages", str(mini_tree)])
    assert rc == patching.EXIT_VERSION
    assert "not the pinned" in capsys.readouterr().err


def test_patched_tree_matches_the_patch_set(engine, pristine):
    """The cached patched tree is exactly pristine + patches (else: rebuild the cache)."""
    patched = _require(engine_sources.tree(engine, "patched"), engine)
    tree = patching.EngineTree(engine, pristine, patching.PINNED[engine])
    for path, (_old, new) in patching.plan(tree, _patch_set(engine), reverse=False).items():
        assert (patched / path.relative_to(pristine)).read_text() == new, (
            f"stale cache: rerun `python -m tools.engine_sources {engine}`"
        )


def test_cpu_suite_in_engine_venv(engine):
    """Import the patched modules with torch on CPU and unit-test every patched function."""
    py = _require(engine_sources.venv_python(engine), engine)
    patched = _require(engine_sources.tree(engine, "patched"), engine)
    path = [str(patched), str(engine_sources.shim_dir()), str(REPO)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    suite = REPO / "tests" / "backends" / f"test_integrations_{engine}_cpu.py"
    proc = subprocess.run(
        [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", engine, str(suite)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, tail  # a broken import skips
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail
