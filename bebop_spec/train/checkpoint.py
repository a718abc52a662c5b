"""Resumable trainer checkpoints: head weights, AdamW state and the step, without pickle.

    checkpoint/head.safetensors       head.state_dict() (float32, training precision)
    checkpoint/optimizer.safetensors  per-parameter AdamW tensors, keyed "{index}.{name}"
    checkpoint/trainer_state.json     step, param_groups (JSON), the TrainConfig used
    checkpoint/head/                  the head in the serving layout (save_mtp_head)

A checkpoint is written to a sibling temporary directory and renamed into place, so a crash
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_FILE, HEAD_FILE, OPT_FILE = "trainer_state.json", "head.safetensors", "optimizer.safetensors"
# Settings a resumed run must share with the run that wrote the checkpoint.
_MUST_MATCH = (
    "loss",
    "gamma",
    "layout",
    "num_layers",
    "batch_size",
    "seq_len",
    "seed",
    "max_chains",
    "chain_context",
)


def save_checkpoint(
    path: Path, head: nn.Module, opt: torch.optim.Optimizer, step: int, cfg, target_config
) -> None:
    """Atomically replace the checkpoint at path with the current state after `step` steps."""
    from bebop_spec.models import save_mtp_head

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(tmp / HEAD_FILE))
    opt_state = opt.state_dict()
    tensors = {
        f"{i}.{name}": torch.as_tensor(value).detach().contiguous()
        for i, per_param in opt_state["state"].items()
        for name, value in per_param.items()
    }
    save_file(tensors, str(tmp / OPT_FILE))
    meta = {"step": step, "param_groups": opt_state["param_groups"], "config": asdict(cfg)}
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_mtp_head(
        head, tmp / "head", getattr(head, "layout", cfg.layout), target_config, cfg.torch_dtype
    )
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, head: nn.Module, opt: torch.optim.Optimizer, cfg) -> int:
    """Restore head and optimiser from path; returns the step to resume at."""
    for name in (STATE_FILE, HEAD_FILE, OPT_FILE):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path}: missing {name}")
    meta = json.loads((path / STATE_FILE).read_text())
    saved, now = meta.get("config", {}), asdict(cfg)
    changed = [k for k in _MUST_MATCH if k in saved and saved[k] != now[k]]
    if changed:
        raise ValueError(
            f"checkpoint {path} was written with different settings: "
            + ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed)
            + "; use a new out directory or the same settings"
        )
    head_state = load_file(str(path / HEAD_FILE), device=str(next(head.parameters()).device))
    head.load_state_dict(head_state, strict=True)
    tensors = load_file(str(path / OPT_FILE), device=str(next(head.parameters()).device))
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    opt.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    return int(meta["step"])
