"""Dequantise a llama.cpp GGUF checkpoint into a plain HF directory (float32 safetensors).

    summary = convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("out_dir"))

transformers (with the `gguf` package) parses the file: its config, its tokenizer (with the
chat template) and its tensors, dequantised and renamed to HF names, with llama.cpp's Q/K row
permutation undone. We build the model skeleton on the meta device only to name the tensors
(no accelerate, no 540 MB random init), then write the tensors ourselves. The result carries no
quantisation marker: to transformers and to bebop_spec.models.load_model it is an ordinary
float32 checkpoint.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bebop_spec.errors import ModelLoadError

# Keys a GGUF-derived config carries that a plain checkpoint must not.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json of the
    GGUF at `gguf_path` into `out_dir`; returns a summary (tensor counts, quant types)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    for key in _DROP_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    with torch.device("meta"):  # names and shapes only
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    state = _check_tensors(tensors["tensors"], skeleton, config)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_config(config, out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out_dir))
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{gguf_path} carries no chat template (tokenizer.chat_template)")
    return {
        "num_tensors": len(state),
        "num_parameters": sum(t.numel() for t in state.values()),
        "dtype": "float32",
        "gguf_tensor_types": _tensor_types(gguf_path),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def _check_tensors(
    tensors: dict[str, Any], skeleton: torch.nn.Module, config: Any
) -> dict[str, torch.Tensor]:
    """float32, contiguous, exactly the skeleton's tensors (less a tied lm_head)."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    state = {k: torch.as_tensor(v).to(torch.float32).contiguous() for k, v in tensors.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"GGUF tensors: missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [k for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if bad:
        raise ModelLoadError(f"GGUF tensors with unexpected shapes: {bad[:5]}")
    return state


def _write_config(config: Any, out_dir: Path) -> None:
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.use_cache = True
    # The dtype the model runs in, as SmolLM2-135M-Instruct's own config declares it: bf16 is
    # what `dtype="auto"` picks where the device has bf16 units (bebop_spec/hardware.py); the
    # file itself stays float32 so the Q4_1 values are exact. transformers >= 4.56 names it
    # `dtype`, older ones `torch_dtype`; bebop reads either.
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", torch.bfloat16)
    config.save_pretrained(str(out_dir))


def _tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many GGUF tensors use each storage type (e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1})."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))
