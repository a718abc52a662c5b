"""`bebop patch`: the unified-diff applier and the all-or-nothing transaction.

Runs on a fake engine tree (no vLLM/SGLang needed). Invariants guarded: a patch set is
applied completely or not at all; applying twice is a no-op; revert restores the original
bytes; a wrong version, a foreign edit, a half-patched tree or an unwritable tree is
refused with a clear message and leaves every file untouched. The shipped patch sets are
found without configuration (package data `bebop_spec._patches`) and parse.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from bebop_spec import patching
from bebop_spec.patching.unidiff import PatchError, apply_hunks, parse_unified_diff, patch_text

ORIG_A = "".join(f"line {i}\n" for i in range(1, 41))
ORIG_B = "def f():\r\n    return 1\r\n"  # CRLF must survive byte-exact


def _diff(path: str, old: str | None, new: str | None) -> str:
    a = (old or "").splitlines(keepends=True)
    b = (new or "").splitlines(keepends=True)
    fa = "/dev/null" if old is None else f"a/{path}"
    fb = "/dev/null" if new is None else f"b/{path}"
    text = "".join(difflib.unified_diff(a, b, fa, fb))
    if new and not new.endswith("\n"):
        text += "\n\\ No newline at end of file\n"
    return text


def _edit_a(text: str) -> str:
    return text.replace("line 5\n", "line 5 patched\n").replace("line 30\n", "line 30\nextra\n")


@pytest.fixture
def tree(tmp_path: Path):
    site = tmp_path / "site"
    (site / "vllm" / "sub").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    (site / "vllm-0.33.0.dist-info").mkdir()
    (site / "vllm-0.33.0.dist-info" / "METADATA").write_text("Name: vllm\nVersion: 0.33.0\n")
    (site / "vllm" / "a.py").write_text(ORIG_A)
    (site / "vllm" / "sub" / "b.py").write_bytes(ORIG_B.encode())
    pdir = tmp_path / "patches" / "vllm-0.33.0"
    pdir.mkdir(parents=True)
    new_b = ORIG_B.replace("return 1", "return 2")
    (pdir / "0001-a.patch").write_text(_diff("vllm/a.py", ORIG_A, _edit_a(ORIG_A)))
    (pdir / "0002-b-and-new.patch").write_bytes(
        (
            _diff("vllm/sub/b.py", ORIG_B, new_b)
            + _diff("vllm/sub/new_mod.py", None, "X = 1\n")
            + _diff("vllm/a.py", _edit_a(ORIG_A), _edit_a(ORIG_A).replace("line 1\n", "line one\n"))
        ).encode()
    )
    return site, tmp_path / "patches"


def _snapshot(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in site.rglob("*") if p.is_file()}


def _run(site, patches, *flags) -> int:
    return patching.main_patch(
        ["vllm", "--site-packages", str(site), "--patches-dir", str(patches), *flags]
    )


def test_apply_is_idempotent_and_revert_is_byte_exact(tree, capsys):
    """check → apply → apply again (no-op) → revert restores the original bytes."""
    site, patches = tree
    before = _snapshot(site)
    assert _run(site, patches, "--check") == 0
    assert _snapshot(site) == before, "--check must not change anything"
    assert _run(site, patches) == 0
    a = (site / "vllm" / "a.py").read_text()
    assert "line 5 patched" in a and "line one" in a and "extra" in a
    assert (site / "vllm" / "sub" / "b.py").read_bytes() == ORIG_B.replace(
        "return 1", "return 2"
    ).encode()
    assert (site / "vllm" / "sub" / "new_mod.py").read_text() == "X = 1\n"
    after = _snapshot(site)
    assert _run(site, patches) == 0 and _snapshot(site) == after
    assert "already patched" in capsys.readouterr().out
    assert _run(site, patches, "--check") == 0
    assert _run(site, patches, "--revert", "--check") == 0 and _snapshot(site) == after
    assert _run(site, patches, "--revert") == 0
    assert _snapshot(site) == before
    assert _run(site, patches, "--revert") == 0 and _snapshot(site) == before


def test_wrong_version_is_refused(tree, capsys):
    """An installed version other than the patch set's makes check and apply exit EXIT_VERSION,
    naming the version found, and leaves every file untouched."""
    site, patches = tree
    (site / "vllm-0.33.0.dist-info" / "METADATA").write_text("Name: vllm\nVersion: 0.32.1\n")
    before = _snapshot(site)
    assert _run(site, patches, "--check") == patching.EXIT_VERSION
    assert _run(site, patches) == patching.EXIT_VERSION
    assert "0.32.1" in capsys.readouterr().err and _snapshot(site) == before


def test_missing_engine_is_refused(tmp_path, capsys):
    """A site-packages without the engine exits EXIT_VERSION with "no vllm package"."""
    assert _run(tmp_path, tmp_path, "--check") == patching.EXIT_VERSION
    assert "no vllm package" in capsys.readouterr().err


def test_foreign_edit_is_a_conflict(tree, capsys):
    """A context line edited by someone else makes check and apply exit EXIT_CONFLICT, report a
    conflict and leave every file untouched."""
    site, patches = tree
    (site / "vllm" / "a.py").write_text(ORIG_A.replace("line 5\n", "line five\n"))
    before = _snapshot(site)
    assert _run(site, patches, "--check") == patching.EXIT_CONFLICT
    assert _run(site, patches) == patching.EXIT_CONFLICT
    assert "conflict" in capsys.readouterr().out and _snapshot(site) == before


def test_half_patched_tree_is_a_conflict(tree):
    """Only the first patch of the set applied: neither direction is clean, nothing is written."""
    site, patches = tree
    (site / "vllm" / "a.py").write_text(_edit_a(ORIG_A))
    before = _snapshot(site)
    assert _run(site, patches) == patching.EXIT_CONFLICT
    assert _run(site, patches, "--revert") == patching.EXIT_CONFLICT
    assert _snapshot(site) == before


def test_unwritable_tree_changes_nothing(tree, monkeypatch, capsys):
    """If part of the tree (vllm/sub) is not writable, apply exits EXIT_WRITE saying so and no
    file changes, the writable ones included."""
    site, patches = tree
    before = _snapshot(site)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if "sub" in str(p) else real(p, m))
    assert _run(site, patches) == patching.EXIT_WRITE
    assert "not writable" in capsys.readouterr().err and _snapshot(site) == before


def test_failed_write_rolls_back(tree, monkeypatch):
    """A write failing half-way restores the files already written (all hunks or none)."""
    site, patches = tree
    before = _snapshot(site)
    real = patching._write
    calls = []

    def flaky(path, content):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, content)

    monkeypatch.setattr(patching, "_write", flaky)
    assert _run(site, patches) == patching.EXIT_WRITE
    assert _snapshot(site) == before


def test_hunk_found_at_offset_but_never_fuzzed():
    """A hunk whose file is shifted by 7 lines still applies at that offset; one changed context
    line (a trailing space) is a PatchError, never a fuzzy match."""
    text = _diff("x.py", ORIG_A, _edit_a(ORIG_A))
    (fp,) = parse_unified_diff(text)
    shifted = "header\n" * 7 + ORIG_A
    assert patch_text(shifted, fp) == "header\n" * 7 + _edit_a(ORIG_A)
    with pytest.raises(PatchError):
        patch_text(ORIG_A.replace("line 4\n", "line 4 \n"), fp)  # one changed context line


def test_no_newline_at_end_of_file_roundtrip():
    """A diff carrying no-newline-at-end-of-file markers applies forward and in reverse exactly,
    adding no final newline."""
    old, new = "a\nb", "a\nc"
    text = "--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n"
    (fp,) = parse_unified_diff(text)
    assert patch_text(old, fp) == new
    assert patch_text(new, fp, reverse=True) == old


def test_creation_and_deletion():
    """A /dev/null-to-file diff creates the file, its reverse deletes it (None), and applying the
    creation over an existing file is a PatchError."""
    (fp,) = parse_unified_diff(_diff("n.py", None, "A\nB\n"))
    assert fp.creates and patch_text(None, fp) == "A\nB\n"
    assert patch_text("A\nB\n", fp, reverse=True) is None
    with pytest.raises(PatchError):
        patch_text("A\nB\n", fp)  # already exists


def test_malformed_diff_is_rejected():
    """A hunk shorter than its header's line counts fails to parse, and a hunk whose lines do not
    match the file fails to apply: both are PatchErrors."""
    with pytest.raises(PatchError):
        parse_unified_diff("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n")
    with pytest.raises(PatchError):
        apply_hunks(["q\n"], parse_unified_diff("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")[0].hunks)


def test_shipped_patch_sets_are_package_data(monkeypatch):
    """Without overrides the sets come from `bebop_spec._patches` (the wheel's copy of
    patches/); every file sits where pyproject's package-data globs pick it up."""
    monkeypatch.delenv("BEBOP_PATCHES_DIR", raising=False)
    base = patching.patches_dir()
    assert base.parts[-2:] == ("bebop_spec", "_patches") and (base / "README.md").is_file()
    shipped = {p.relative_to(base).as_posix() for p in base.rglob("*.patch")}
    assert shipped == {p.relative_to(base).as_posix() for p in base.glob("*/*.patch")}
    for engine, version in patching.PINNED.items():
        for name, file_patches in patching.load_patch_set(engine, version, base):
            assert file_patches, name
    sglang = [n for n, _ in patching.load_patch_set("sglang", patching.PINNED["sglang"], base)]
    assert "0003-dense-target-mtp-heads.patch" in sglang
    monkeypatch.setenv("BEBOP_PATCHES_DIR", "/elsewhere")
    assert patching.patches_dir() == Path("/elsewhere")
    assert patching.patches_dir("/cli") == Path("/cli")
