"""Load Hugging Face checkpoints (config.json + safetensors) into DenseDecoder / MTPHead.

    loaded = load_model("path/to/Qwen3-0.6B", mtp=None, dtype=torch.bfloat16, device="cuda")
    loaded.config, loaded.target, loaded.mtp, loaded.tokenizer

`mtp=None` loads the head stored in the model directory itself when its config declares one;
`mtp="dir"` loads a separately saved head (bebop_spec.models.mtp_io); `mtp=False` loads none.
Missing, unexpected or mis-shaped tensors raise ModelLoadError naming the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bebop_spec.errors import ModelLoadError
from bebop_spec.models.checkpoint import Checkpoint, is_mtp_name
from bebop_spec.models.config import MTP_LAYOUTS, ModelConfig
from bebop_spec.models.decoder import DenseDecoder
from bebop_spec.models.mtp import MTPHead

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    config: ModelConfig
    target: DenseDecoder
    mtp: MTPHead | None
    tokenizer: Any | None  # transformers tokenizer, or None when the directory has none


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def fill_module(
    module: nn.Module,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device | str,
    what: str,
) -> nn.Module:
    """Load every tensor of `module.state_dict()` (same names) from `ckpt`, checking shapes.

    `module` may live on the meta device; its tensors are replaced (assign) then moved.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in ckpt.shapes]
    if missing:
        shown = ", ".join(f"{k!r} (expected {list(expected[k])})" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{what}: missing tensor {shown}{more} in {ckpt.directory}")
    for name, shape in expected.items():
        if ckpt.shapes[name] != shape:
            raise ModelLoadError(
                f"{what}: tensor {name!r} has shape {list(ckpt.shapes[name])} in "
                f"{ckpt.location[name].name}, expected {list(shape)}"
            )
    tensors = {k: t.to(dtype) for k, t in ckpt.read(list(expected)).items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.to(device)


def load_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a model directory; eos ids from generation_config.json are merged in."""
    directory = Path(path)
    hf = read_json(directory / "config.json")
    try:
        config = ModelConfig.from_hf(hf)
    except ValueError as e:
        raise ModelLoadError(f"{directory / 'config.json'}: {e}") from None
    gen = directory / "generation_config.json"
    if gen.is_file():
        extra = read_json(gen).get("eos_token_id")
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        config.eos_token_ids += [i for i in extra if i not in config.eos_token_ids]
    return config


def load_target(
    ckpt: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> DenseDecoder:
    with torch.device("meta"):
        target = DenseDecoder(config)
    fill_module(target, ckpt, dtype, device, "target")
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in ckpt.names() - set(target.state_dict())
        if n not in ignorable and not n.endswith("rotary_emb.inv_freq")
        and not is_mtp_name(n, config.num_hidden_layers)
    )  # fmt: skip
    if unexpected:
        raise ModelLoadError(f"target: unexpected tensor(s) in {ckpt.directory}: {unexpected[:5]}")
    return target


def load_model(
    path: str | Path,
    mtp: str | Path | bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Target (+ optional MTP head, + tokenizer if present) from an HF model directory."""
    from bebop_spec.models.mtp_io import load_mtp_head  # mtp_io builds on this module

    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    config = load_config(directory)
    ckpt = Checkpoint(directory)
    target = load_target(ckpt, config, dtype, device)
    head = None
    if mtp is None and config.mtp_num_layers > 0:
        head = load_mtp_head(directory, config, dtype=dtype, device=device, checkpoint=ckpt)
    elif mtp is not None and mtp is not False:
        if mtp is True:
            mtp = directory
        head = load_mtp_head(mtp, config, dtype=dtype, device=device)
    return LoadedModel(config, target, head, load_tokenizer(directory))


def load_tokenizer(directory: str | Path) -> Any | None:
    directory = Path(directory)
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - surface any tokenizer failure as a load error
        raise ModelLoadError(f"tokenizer files in {directory} could not be loaded: {e}") from e


def init_mtp_head(
    config: ModelConfig, layout: str | None = None, num_layers: int = 1, seed: int = 0
) -> MTPHead:
    """A fresh random head: linear weights ~ N(0, initializer_range), biases 0, norms = identity."""
    layout = layout or config.mtp_layout or "qwen3_next"
    if layout not in MTP_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {MTP_LAYOUTS}")
    std = float(config.hf.get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    head = MTPHead(config, layout, num_layers)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
    return head


def save_model(target: DenseDecoder, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors that load_model (and transformers) can read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: _export(v, dtype) for k, v in target.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = target.config.to_hf()
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers", "bebop_mtp"):
        hf.pop(key, None)  # the target alone: no head in this directory
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out


def _export(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()
