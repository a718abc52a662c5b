"""A small, strict unified-diff parser and applier (pure Python, no `patch` binary).

Strict means: every context and removed line must match exactly. A hunk may be found at
an offset from the line number it names (files drift by a few lines between builds of
the same version), but never with fuzz. Applying is done in memory; writing files is the
caller's business (see `bebop_spec.patching`, which makes it all-or-nothing).

    patches = parse_unified_diff(text)
    new_lines = apply_hunks(old_lines, patches[0].hunks)            # forward
    old_lines = apply_hunks(new_lines, patches[0].hunks, reverse=True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_NO_NEWLINE = "\\ No newline at end of file"
DEV_NULL = "/dev/null"


class PatchError(ValueError):
    """A diff that cannot be parsed, or a hunk that does not match the file."""


@dataclass
class Hunk:
    old_start: int  # 1-based; 0 when the old side is empty
    new_start: int
    lines: list[str] = field(default_factory=list)  # ' x\n', '-x\n', '+x\n' (keepends)

    def side(self, reverse: bool) -> tuple[list[str], list[str]]:
        """(lines to find, lines to put) for this direction."""
        old = [ln[1:] for ln in self.lines if ln[0] in " -"]
        new = [ln[1:] for ln in self.lines if ln[0] in " +"]
        return (new, old) if reverse else (old, new)

    def start(self, reverse: bool) -> int:
        return self.new_start if reverse else self.old_start


@dataclass
class FilePatch:
    old_path: str  # path with the a/ prefix stripped, or /dev/null
    new_path: str
    hunks: list[Hunk]

    @property
    def path(self) -> str:
        return self.old_path if self.new_path == DEV_NULL else self.new_path

    @property
    def creates(self) -> bool:
        return self.old_path == DEV_NULL

    @property
    def deletes(self) -> bool:
        return self.new_path == DEV_NULL


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split on '\n' only (str.splitlines also splits on form
    feeds and other separators that source files may contain)."""
    lines = text.split("\n")
    out = [ln + "\n" for ln in lines[:-1]]
    return out + [lines[-1]] if lines[-1] else out


def _strip(path: str, strip: int) -> str:
    path = path.split("\t")[0].strip()
    if path == DEV_NULL:
        return path
    parts = path.split("/")
    if len(parts) <= strip:
        raise PatchError(f"cannot strip {strip} components from {path!r}")
    return "/".join(parts[strip:])


def parse_unified_diff(text: str, strip: int = 1) -> list[FilePatch]:
    """Parse `diff -u` / `git diff` output into per-file hunks."""
    lines = split_lines(text)
    patches: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("--- ") and i + 1 < len(lines)):
            i += 1
            continue
        if not lines[i + 1].startswith("+++ "):
            raise PatchError(f"line {i + 2}: '+++' expected after '---'")
        fp = FilePatch(_strip(lines[i][4:], strip), _strip(lines[i + 1][4:], strip), [])
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            hunk, i = _parse_hunk(lines, i)
            fp.hunks.append(hunk)
        if not fp.hunks:
            raise PatchError(f"{fp.path}: no hunks")
        patches.append(fp)
    return patches


def _parse_hunk(lines: list[str], i: int) -> tuple[Hunk, int]:
    m = _HUNK_RE.match(lines[i])
    if not m:
        raise PatchError(f"line {i + 1}: bad hunk header {lines[i]!r}")
    old_len = int(m.group(2)) if m.group(2) is not None else 1
    new_len = int(m.group(4)) if m.group(4) is not None else 1
    hunk = Hunk(int(m.group(1)), int(m.group(3)))
    i += 1
    n_old = n_new = 0
    while n_old < old_len or n_new < new_len:
        if i >= len(lines):
            raise PatchError(f"hunk at line {hunk.old_start} is truncated")
        ln = lines[i]
        if ln.rstrip("\r\n") == "":
            ln = " " + ln  # some tools drop the space of an empty context line
        tag = ln[0]
        if tag not in " +-":
            raise PatchError(f"line {i + 1}: unexpected {ln!r} inside a hunk")
        n_old += tag in " -"
        n_new += tag in " +"
        hunk.lines.append(ln)
        i += 1
        if i < len(lines) and lines[i].rstrip("\r\n") == _NO_NEWLINE:
            hunk.lines[-1] = hunk.lines[-1].rstrip("\r\n")
            i += 1
    return hunk, i


def _find(lines: list[str], want: list[str], hint: int, lo: int) -> int:
    """Index >= lo where `want` occurs, nearest to `hint`; -1 if nowhere."""
    n = len(want)
    candidates = range(lo, len(lines) - n + 1)
    for pos in sorted(candidates, key=lambda p: abs(p - hint)):
        if lines[pos : pos + n] == want:
            return pos
    return -1


def apply_hunks(lines: list[str], hunks: list[Hunk], reverse: bool = False) -> list[str]:
    """Apply (or un-apply) hunks to a file's lines; raise PatchError on any mismatch."""
    out: list[str] = []
    cursor = 0
    for k, hunk in enumerate(hunks):
        find, put = hunk.side(reverse)
        hint = max(hunk.start(reverse) - 1, 0) if find else hunk.start(reverse)
        pos = _find(lines, find, hint, cursor)
        if pos < 0:
            raise PatchError(f"hunk #{k + 1} (line {hunk.start(reverse)}) does not match")
        out += lines[cursor:pos] + put
        cursor = pos + len(find)
    return out + lines[cursor:]


def patch_text(old: str | None, fp: FilePatch, reverse: bool = False) -> str | None:
    """New content of one file (None: the file is deleted). `old` None: file absent."""
    creates, deletes = (fp.deletes, fp.creates) if reverse else (fp.creates, fp.deletes)
    if creates and old is not None:
        raise PatchError("file already exists")
    if not creates and old is None:
        raise PatchError("file is missing")
    new = "".join(apply_hunks(split_lines(old or ""), fp.hunks, reverse))
    if deletes:
        if new:
            raise PatchError("file to delete has unexpected content")
        return None
    return new
