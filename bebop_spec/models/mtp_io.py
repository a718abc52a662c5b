"""Save and load MTP heads as checkpoints vLLM / SGLang-style loaders read (docs/mtp_layout.md).

    save_mtp_head(head, "out/head")                          # separate directory
    save_mtp_head(head, "models/Qwen3-8B", into_target=True)  # mixed into the target checkpoint
    head = load_mtp_head("out/head", target_config)          # either form, either layout

A separate directory holds `config.json` (the target's config plus `mtp_num_hidden_layers` or
`num_nextn_predict_layers`, and a `bebop_mtp` block) and `model.safetensors` with the head's
tensors. Mixed into a target, the head goes to `mtp.safetensors`, listed in
`model.safetensors.index.json`, and the target's config.json gains the MTP keys — the way
Qwen3.5 / DeepSeek-V3 checkpoints ship their heads. Embedding and LM head are always the
target's; copies found in a head checkpoint are ignored, as vLLM does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from bebop_spec.errors import ModelLoadError
from bebop_spec.models.checkpoint import INDEX_FILE, Checkpoint, is_mtp_name
from bebop_spec.models.config import ModelConfig, detect_mtp
from bebop_spec.models.decoder import DenseDecoder
from bebop_spec.models.loader import fill_module, read_json
from bebop_spec.models.mtp import MTPHead

BEBOP_KEY = "bebop_mtp"  # our own config block: {"layout", "num_layers", "format"}
MTP_SHARD = "mtp.safetensors"
_LAYOUT_KEY = {"qwen3_next": "mtp_num_hidden_layers", "deepseek_v3": "num_nextn_predict_layers"}
_SHARED_SUFFIXES = ("embed_tokens.weight", "shared_head.head.weight", "lm_head.weight")


# ------------------------------------------------------------------------------------ saving
def save_mtp_head(
    head: MTPHead,
    out_dir: str | Path,
    layout: str | None = None,
    target_config: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
    *,
    into_target: bool = False,
    target: DenseDecoder | None = None,
) -> Path:
    """Write `head` (whose layout must be `layout`, if given) to `out_dir`; returns the directory.

    `target_config` (default `head.config`) supplies config.json. `dtype` casts the tensors.
    `into_target=True` mixes the head into the target checkpoint at `out_dir`. `target`, for a
    separate directory, adds copies of its embedding / LM head so engines that load the
    draft directory on its own find them.
    """
    layout = layout or head.layout
    cfg = target_config or head.config
    if cfg.hidden_size != head.config.hidden_size or cfg.vocab_size != head.config.vocab_size:
        raise ValueError("target_config does not match the head (hidden_size / vocab_size)")
    if layout != head.layout:
        raise ValueError(
            f"head has layout {head.layout!r}, asked to save as {layout!r}: layouts are not "
            "interchangeable (deepseek_v3 zeroes the position-0 embedding); train in the layout "
            "you will serve"
        )
    tensors = {k: _export(v, dtype) for k, v in head.state_dict().items()}
    out = Path(out_dir)
    if into_target:
        _merge_into_target(out, tensors, layout, head.num_layers)
        return out
    out.mkdir(parents=True, exist_ok=True)
    if target is not None:
        tensors.update(_shared_copies(target, layout, cfg, head.num_layers, dtype))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = _with_mtp_keys(cfg.to_hf(), layout, head.num_layers)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out


def _export(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


def _with_mtp_keys(hf: dict, layout: str, num_layers: int) -> dict:
    for key in (*_LAYOUT_KEY.values(), BEBOP_KEY):
        hf.pop(key, None)
    hf[_LAYOUT_KEY[layout]] = num_layers
    if layout == "qwen3_next":
        hf["mtp_use_dedicated_embeddings"] = False  # as Qwen3-Next / Qwen3.5 configs say
    hf[BEBOP_KEY] = {"layout": layout, "num_layers": num_layers, "format": 1}
    return hf


def _shared_copies(target: DenseDecoder, layout: str, cfg: ModelConfig, n: int,
                   dtype: torch.dtype | None) -> dict[str, torch.Tensor]:  # fmt: skip
    embed = _export(target.model.embed_tokens.weight, dtype)
    head = _export(target.lm_head_weight, dtype)
    if layout == "qwen3_next":
        return {"model.embed_tokens.weight": embed, "lm_head.weight": head.clone()}
    out = {}
    for i in range(n):  # DeepSeek-V3 checkpoints carry both per MTP layer
        prefix = f"model.layers.{cfg.num_hidden_layers + i}."
        out[prefix + "embed_tokens.weight"] = embed.clone()
        out[prefix + "shared_head.head.weight"] = head.clone()
    return out


def _merge_into_target(directory: Path, tensors: dict, layout: str, num_layers: int) -> None:
    """Add the head as `mtp.safetensors` to a target checkpoint, its index and its config."""
    ckpt = Checkpoint(directory)
    cfg_hf = read_json(directory / "config.json")
    n_layers = cfg_hf["num_hidden_layers"]
    clash = sorted(
        n for n, f in ckpt.location.items() if f.name != MTP_SHARD and is_mtp_name(n, n_layers)
    )
    if clash:
        raise ModelLoadError(
            f"{directory} already holds MTP tensors outside {MTP_SHARD} (e.g. {clash[0]!r}); "
            "save the head to a separate directory instead"
        )
    save_file(tensors, str(directory / MTP_SHARD), metadata={"format": "pt"})
    weight_map = {n: f.name for n, f in ckpt.location.items() if f.name != MTP_SHARD}
    weight_map.update({n: MTP_SHARD for n in tensors})
    files = {directory / f for f in weight_map.values()}
    index = {
        "metadata": {"total_size": sum(f.stat().st_size for f in files)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(
        json.dumps(_with_mtp_keys(cfg_hf, layout, num_layers), indent=2)
    )


# ----------------------------------------------------------------------------------- loading
def load_mtp_head(
    path: str | Path,
    target_config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    checkpoint: Checkpoint | None = None,
) -> MTPHead:
    """An MTP head (either layout) from a separate head directory or a target directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"MTP head directory {directory} does not exist")
    hf = read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    for key in ("hidden_size", "vocab_size"):
        ours, theirs = getattr(target_config, key), hf.get(key, getattr(target_config, key))
        if theirs != ours:
            raise ModelLoadError(
                f"MTP head in {directory}: {key} mismatch between head ({theirs}) and target "
                f"({ours})"
            )
    ckpt = checkpoint or Checkpoint(directory)
    layout, num_layers = _detect(hf, ckpt, target_config.num_hidden_layers, directory)
    _check_fc_width(ckpt, layout, target_config)
    with torch.device("meta"):
        head = MTPHead(target_config, layout, num_layers)
    fill_module(head, ckpt, dtype, device, f"MTP head ({layout})")
    first = target_config.num_hidden_layers
    unexpected = sorted(
        n for n in ckpt.names() - set(head.state_dict())
        if _in_head_namespace(n, layout, first) and not n.endswith(_SHARED_SUFFIXES)
    )  # fmt: skip
    if unexpected:
        raise ModelLoadError(f"MTP head ({layout}): unexpected tensor(s) {unexpected[:5]}")
    return head


def _check_fc_width(ckpt: Checkpoint, layout: str, cfg: ModelConfig) -> None:
    """The fc / eh_proj input is [embedding, hidden]: its shape pins the head's hidden size."""
    name = "mtp.fc.weight" if layout == "qwen3_next" else (
        f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight")  # fmt: skip
    shape = ckpt.shapes.get(name)
    h = cfg.hidden_size
    if shape is not None and shape != (h, 2 * h):
        raise ModelLoadError(
            f"MTP head: hidden_size mismatch between head and target: {name!r} has shape "
            f"{list(shape)}, a target with hidden_size {h} needs [{h}, {2 * h}]"
        )


def _detect(hf: dict, ckpt: Checkpoint, first: int, directory: Path) -> tuple[str, int]:
    """(layout, num_layers) from the bebop block, the HF MTP keys, or else the tensor names."""
    block = hf.get(BEBOP_KEY)
    if block:
        return block["layout"], int(block["num_layers"])
    n, layout = detect_mtp(hf)
    if layout is not None:
        return layout, n
    names = ckpt.names()
    qn = {m.group(1) for m in map(re.compile(r"mtp\.layers\.(\d+)\.").match, names) if m}
    if "mtp.fc.weight" in names and qn:
        return "qwen3_next", len(qn)
    ds = {n for n in names if n.endswith(".eh_proj.weight") and is_mtp_name(n, first)}
    if ds:
        return "deepseek_v3", len(ds)
    raise ModelLoadError(f"no MTP head found in {directory}")


def _in_head_namespace(name: str, layout: str, first: int) -> bool:
    if layout == "qwen3_next":
        return name.startswith("mtp.")
    return not name.startswith("mtp.") and is_mtp_name(name, first)


DRAFT_VOCAB_FILE = "draft_vocab.json"  # {"token_ids": ranked ids, most frequent first, ...}


def save_draft_vocab(directory: str | Path, ranked: list[int], **provenance: object) -> Path:
    """Write the head's token ranking (spec/draft_vocab.rank_tokens) beside its weights."""
    path = Path(directory) / DRAFT_VOCAB_FILE
    path.write_text(json.dumps({"token_ids": [int(t) for t in ranked], **provenance}))
    return path


def draft_vocab_default(directory: str | Path) -> int | None:
    """The draft-vocabulary size a head ships as its default (`default_size`), if any."""
    path = Path(directory) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    size = read_json(path).get("default_size")
    return int(size) if size else None


def resolve_draft_vocab(directory: str | Path, size: int | None, vocab_size: int
                        ) -> list[int] | None:  # fmt: skip
    """The token ids a head in `directory` drafts over when served with draft_vocab_size =
    `size` (None: the head's own default, `draft_vocab_default`; 0: all): None when that is
    the whole vocabulary."""
    k = draft_vocab_default(directory) if size is None else size
    if not k or k >= vocab_size:
        return None
    return load_draft_vocab(directory, k, vocab_size)


def load_draft_vocab(directory: str | Path, size: int, vocab_size: int) -> list[int]:
    """The `size` most frequent token ids of the head in `directory` (ModelLoadError if it
    has no ranking or the ranking does not fit the vocabulary)."""
    path = Path(directory) / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise ModelLoadError(f"draft_vocab_size needs {path} (build it: bebop mtp draft-vocab)")
    ids = read_json(path).get("token_ids")
    if not isinstance(ids, list) or len(set(ids)) != len(ids) or len(ids) < size:
        raise ModelLoadError(f"{path}: token_ids must hold at least {size} distinct ids")
    chosen = [int(t) for t in ids[:size]]
    if not all(0 <= t < vocab_size for t in chosen):
        raise ModelLoadError(f"{path}: token ids outside the vocabulary [0, {vocab_size})")
    return chosen
