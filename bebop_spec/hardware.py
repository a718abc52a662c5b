"""What the hardware computes natively, and how much memory the KV cache may take.

resolve_dtype("auto", "bfloat16", "cpu")  # -> "bfloat16" on a CPU with AMX / avx512_bf16
kv_budget_bytes(None, "cpu")              # -> the default KV budget for this machine
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
_HALF = ("bfloat16", "float16")
DEFAULT_KV_GIB = 4.0  # the default budget's cap; at most a quarter of RAM / free GPU memory


@functools.cache
def cpu_has_bf16_units() -> bool:
    """True on x86 CPUs with AMX tiles or AVX-512 BF16 (where a bf16 matmul beats fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def bf16_native(device: str) -> bool:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and cpu_has_bf16_units()


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: str) -> str:
    """`auto`: the checkpoint's half dtype where the device computes it natively, else float32
    (a float32 checkpoint stays float32, as transformers' dtype="auto" keeps it)."""
    if requested != "auto":
        return requested
    if checkpoint_dtype in _HALF and bf16_native(device):
        return "bfloat16"
    return "float32"


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype a model directory's config.json declares (`dtype` or `torch_dtype`)."""
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("dtype") or cfg.get("torch_dtype")


def kv_budget_bytes(gib: float | None, device: str) -> int:
    """Bytes the KV cache may use: `gib` when given, else min(DEFAULT_KV_GIB, a quarter of the
    machine's RAM, or of the GPU's free memory)."""
    if gib is not None:
        return int(gib * 2**30)
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        avail = free
    else:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(DEFAULT_KV_GIB * 2**30, avail / 4))
