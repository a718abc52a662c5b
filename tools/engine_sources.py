"""Fetch the pinned vLLM / SGLang sources, patch them, and build a CPU import venv.

    python -m tools.engine_sources vllm      # ~1 min download, ~1 min venv
    python -m tools.engine_sources sglang
    pytest -m "vllm or sglang" tests/                          # then uses the cache

Layout under the cache dir ($BEBOP_ENGINE_CACHE, default ~/.cache/bebop/engines):
  wheels/                         the pinned wheels (`pip download --no-deps`)
  <engine>-<version>/pristine/    the wheel's Python tree (compiled extensions left out)
  <engine>-<version>/patched/     the same with `bebop patch` applied
  venv-<engine>/                  a venv whose `bebop-host.pth` appends the *running*
                                  interpreter's site-packages (its pinned torch, numpy, fastapi,
                                  transformers …), plus the engine's light, pure-Python
                                  dependencies, resolved by pip under a constraint that pins
                                  torch and numpy to the host's versions (never replaced)

Nothing here installs vLLM or SGLang into an environment: the trees are only put on
PYTHONPATH by the tests, which is enough to import their modules on CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from bebop_spec.patching import PINNED, run

# Light packages the patched modules import at load time, found by importing them in a venv
# that sees only this project's environment; pip resolves their own dependencies. torch,
# numpy, fastapi, pydantic and prometheus_client come from the host environment.
_COMMON = (
    "attrs ipython aiohttp aiosignal aiohappyeyeballs frozenlist multidict propcache yarl "
    "msgspec psutil"
)
LIGHT_DEPS = {
    "vllm": (
        f"{_COMMON} apache-tvm-ffi==0.1.11 blake3 cachetools cbor2 einops ijson llguidance "
        "openai openai-harmony partial-json-parser py-cpuinfo pybase64 python-json-logger "
        "pyzmq regex sentencepiece setproctitle tiktoken uvloop xgrammar==0.2.8 cloudpickle"
    ).split()
    + ["transformers>=5.16.1,<5.21"],
    "sglang": (
        f"{_COMMON} apache-tvm-ffi==0.1.11 orjson pybase64 pyzmq setproctitle python-multipart "
        "partial-json-parser einops llguidance openai openai-harmony interegular blobfile "
        "sentencepiece tiktoken dill compressed-tensors loguru gguf triton"
    ).split(),
}
# SGLang's module graph imports torchvision, whose PyPI wheels need a CUDA torch; with a
# CPU-only torch the tests use this inert stand-in (import-time attributes only).
TORCHVISION_SHIM = Path(__file__).with_name("torchvision_shim.py")
_BINARY_SUFFIXES = (".so", ".cubin", ".fatbin", ".a", ".bin", ".ptx")


def cache_dir() -> Path:
    return Path(os.environ.get("BEBOP_ENGINE_CACHE", Path.home() / ".cache" / "bebop" / "engines"))


def tree(engine: str, kind: str, base: Path | None = None) -> Path:
    """<cache>/<engine>-<version>/<kind>, kind = pristine | patched."""
    return (base or cache_dir()) / f"{engine}-{PINNED[engine]}" / kind


def venv_python(engine: str, base: Path | None = None) -> Path:
    return (base or cache_dir()) / f"venv-{engine}" / "bin" / "python"


def download(engine: str, base: Path) -> Path:
    wheels = base / "wheels"
    pattern = f"{engine}-{PINNED[engine]}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"{engine}=={PINNED[engine]}",
                "-d",
                str(wheels),
            ],
            check=True,
        )
        found = sorted(wheels.glob(pattern))
    return found[0]


def extract(wheel: Path, dest: Path) -> None:
    """The wheel's files minus compiled extensions, into dest (replaced)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            base = name.rsplit("/", 1)[-1]
            if not any(base.endswith(s) or f"{s}." in base for s in _BINARY_SUFFIXES):
                zf.extract(name, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def host_site_packages() -> list[str]:
    """The running interpreter's site-packages (purelib and platlib), where its torch lives.

    `--system-site-packages` would expose the *base* interpreter's packages instead: run from a
    venv (as CI does), that is the bare system Python, which has no torch on a fresh machine.
    """
    import sysconfig

    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    return sorted(p for p in paths if p and Path(p).is_dir())


def host_pins() -> str:
    """pip constraints holding the heavy host packages at the versions this interpreter has."""
    from importlib.metadata import version

    return "".join(f"{name}=={version(name)}\n" for name in ("torch", "numpy"))


def make_venv(engine: str, base: Path) -> Path:
    """A venv for importing the patched engine: its own light dependencies first on sys.path,
    then (through a .pth file, so after them) this interpreter's site-packages."""
    py = venv_python(engine, base)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "bebop-host.pth").write_text("\n".join(host_site_packages()) + "\n")
    check = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode:
        raise SystemExit(f"venv-{engine} cannot import torch from {host_site_packages()}:\n"
                         f"{check.stderr.strip()}")  # fmt: skip
    pins = py.parent.parent / "host-constraints.txt"
    pins.write_text(host_pins())
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "-c", str(pins), *LIGHT_DEPS[engine]], check=True
    )
    if engine == "sglang" and _cpu_only_torch():
        shim = shim_dir(base) / "torchvision"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text(TORCHVISION_SHIM.read_text())
    return py


def shim_dir(base: Path | None = None) -> Path:
    """Goes on PYTHONPATH after the engine tree when the SGLang tests import it on CPU."""
    return (base or cache_dir()) / "shims"


def _cpu_only_torch() -> bool:
    import torch

    return torch.version.cuda is None


def prepare(engine: str, base: Path | None = None, with_venv: bool = True) -> None:
    base = base or cache_dir()
    t0 = time.time()
    wheel = download(engine, base)
    pristine, patched = tree(engine, "pristine", base), tree(engine, "patched", base)
    pristine.parent.mkdir(parents=True, exist_ok=True)
    if not (pristine / engine / "__init__.py").exists():
        extract(wheel, pristine)
    shutil.rmtree(patched, ignore_errors=True)
    shutil.copytree(pristine, patched)
    rc = run(engine, check=False, revert=False, site_packages=str(patched), patches=None)
    if rc:
        raise SystemExit(f"patching {patched} failed (exit {rc})")
    if with_venv:
        make_venv(engine, base)
    print(f"{engine}: ready under {pristine.parent} in {time.time() - t0:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+", choices=sorted(PINNED))
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--no-venv", action="store_true", help="only download, extract and patch")
    args = ap.parse_args(argv)
    for engine in args.engines:
        prepare(engine, args.cache_dir, with_venv=not args.no_venv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
