"""Export a trained MTP head in the layout a serving engine loads (docs/serving_heads.md).

    export_head("runs/mtp/head", "path/to/target", "qwen3_next", "export/qwen3_next")
    export_head(..., "deepseek_v3", "export/ds", convert=True)   # layout change, see below
    export_head(..., into_target=True)        # a copy of the target with the head mixed in

Layouts (docs/mtp_layout.md): `qwen3_next` writes `mtp.*` tensors and `mtp_num_hidden_layers`
(Qwen3-Next / Qwen3.5 loaders); `deepseek_v3` writes `model.layers.{N}.*` and
`num_nextn_predict_layers` (DeepSeek-V3 loaders). The separate directory also carries copies
of the target's embedding / LM head for engines that load a draft directory on its own.

Changing layout is not exact: `deepseek_v3` zeroes the token embedding at position 0
(vLLM deepseek_mtp.py:123) and `qwen3_next` does not, so a converted head drafts slightly
differently (sampling stays exact; only acceptance can move). It needs `convert=True`; the
weights map one to one (zero-centred `(1 + w)` norms <-> standard `w` norms).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bebop_spec.models.config import MTP_LAYOUTS, ModelConfig
from bebop_spec.models.layers import DecoderLayer
from bebop_spec.models.mtp import MTPHead

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def convert_layout(head: MTPHead, layout: str) -> MTPHead:
    """The same weights in the other layout (see the module docstring for what changes)."""
    if layout not in MTP_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {MTP_LAYOUTS}")
    if layout == head.layout:
        return head
    if head.num_layers != 1:  # qwen3_next shares fc / norms across layers, deepseek_v3 does not
        raise ValueError(
            f"layout conversion supports one-layer heads, this one has {head.num_layers}"
        )
    new = MTPHead(head.config, layout, 1).to(next(head.parameters()).dtype)
    src, dst = head.parts(0), new.parts(0)
    for s, d in [*zip(src[:2], dst[:2], strict=True), (src[4], dst[4])]:
        # effective scale: (1 + w) when zero-centred, w otherwise
        scale = s.weight.float() + (1.0 if s.zero_centered else 0.0)
        d.weight.copy_(scale - (1.0 if d.zero_centered else 0.0))
    dst[2].weight.copy_(src[2].weight)
    layer_keys = set(DecoderLayer(head.config, 0).state_dict())  # the plain decoder layer
    state = {k: v for k, v in src[3].state_dict().items() if k in layer_keys}
    missing, _ = dst[3].load_state_dict(state, strict=False)
    if [k for k in missing if k in layer_keys]:
        raise ValueError(f"layout conversion: decoder-layer tensors missing: {missing[:3]}")
    return new


def _copy_target(model_dir: Path, out: Path) -> None:
    """Copy the target checkpoint (config, weights, tokenizer) without any MTP tensors' shard."""
    if out.resolve() == model_dir.resolve():
        raise ValueError("--out must differ from --model (the target is copied, not modified)")
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "mtp.safetensors":
            shutil.copy2(f, out / f.name)
    hf = json.loads((out / "config.json").read_text())
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers", "bebop_mtp"):
        hf.pop(key, None)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    index = out / "model.safetensors.index.json"
    if index.is_file():  # drop entries of the skipped mtp shard; _merge re-adds the new head
        doc = json.loads(index.read_text())
        doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if v != "mtp.safetensors"}
        index.write_text(json.dumps(doc, indent=2))


def export_head(
    head_dir: str | Path,
    model_dir: str | Path,
    layout: str,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    convert: bool = False,
    into_target: bool = False,
    shared_copies: bool = True,
) -> Path:
    """Write the head at head_dir (trained for the target at model_dir) to out_dir in `layout`."""
    from bebop_spec.models import load_config, load_model, load_mtp_head, save_mtp_head

    if layout not in MTP_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {MTP_LAYOUTS}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    model_dir, out = Path(model_dir), Path(out_dir)
    config: ModelConfig = load_config(model_dir)
    head = load_mtp_head(head_dir, config)  # checks hidden size / vocabulary against the target
    if head.layout != layout and not convert:
        raise ValueError(
            f"head {head_dir} is in the {head.layout} layout, asked for {layout}: the layouts "
            "differ at position 0 (deepseek_v3 zeroes the token embedding there), so converting "
            f"changes the drafts slightly; pass --convert to accept, or train with --layout {layout}"
        )
    head = convert_layout(head, layout)
    torch_dtype = _DTYPES[dtype] if dtype else None
    if into_target:
        _copy_target(model_dir, out)
        return save_mtp_head(head, out, layout, config, torch_dtype, into_target=True)
    target = load_model(model_dir, mtp=False).target if shared_copies else None
    return save_mtp_head(head, out, layout, config, torch_dtype, target=target)


__all__ = ["convert_layout", "export_head"]
