"""Tiny models and tokenizers for tests, examples and benchmarks (made locally, no hub).

path = make_tiny_model(tmp_path / "m", vocab_size=16, mtp_layout="qwen3_next")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_TOY_TEXT = (
    "The quick brown fox jumps over the lazy dog. 1 + 2 = 3. def add(a, b): return a + b\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}} Hello world! How are you today?'
)


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 320) -> int:
    """Train a byte-level BPE on a toy text, save it HF-style; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOY_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def make_tiny_model(
    out_dir: str | Path,
    vocab_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    mtp_layout: str | None = "qwen3_next",
    with_tokenizer: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 512,
    eos_token_id: int | None = None,
    family: str = "qwen3",
) -> Path:
    """A random Qwen3 (or qwen2 / llama) target saved with transformers, plus a random MTP head
    in ``out_dir/mtp`` (``mtp_layout``; None for no head); fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        vocab_size = max(vocab_size, make_tiny_tokenizer(out))
    eos = eos_token_id
    if with_tokenizer and eos is None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(str(out)).eos_token_id
    model_type = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}[family]
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos if eos is not None else vocab_size - 1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    with torch.no_grad():  # logits of std ~2: entropies well below log V, like a trained LM
        model.lm_head.weight.normal_(0, 0.25)
        model.get_input_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    if mtp_layout is not None:
        add_random_mtp(out, mtp_layout, seed=seed + 1)
    return out


def add_random_mtp(
    model_dir: str | Path, layout: str, seed: int = 1, out_dir: str | Path | None = None
) -> Path:
    """Save a random MTP head for the model at model_dir (into out_dir, default model_dir/mtp)."""
    from bebop_spec.models import ModelConfig, init_mtp_head, save_mtp_head

    model_dir = Path(model_dir)
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    head = init_mtp_head(config, layout, num_layers=1, seed=seed)
    dest = Path(out_dir) if out_dir is not None else model_dir / "mtp"
    save_mtp_head(head, dest, layout, config, torch.float32)
    return dest


def randomize_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1): every tensor visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if "norm" in name else noise)


def exact_joint(model_dir: str | Path, params, prompt: list[int], vocab: int, depth: int,
                device: str = "cpu") -> torch.Tensor:  # fmt: skip
    """p(x_1..x_depth) for all vocab^depth continuations of `prompt` [vocab^depth] (float64),
    from full forwards of the target (no cache) under `params`' sampling transforms; the
    penalties / min_tokens (with the model's EOS ids) see each prefix as the output so far."""
    import itertools

    from bebop_spec.models import load_model
    from bebop_spec.spec import SamplingTensors, TokenHistory, process_logits

    loaded = load_model(str(model_dir), device=device)
    target = loaded.target
    st = SamplingTensors.from_params([params], device, loaded.config.eos_token_ids)
    joint = torch.ones([vocab] * depth, dtype=torch.float64, device=device)
    for d in range(depth):
        prefixes = [list(p) for p in itertools.product(range(vocab), repeat=d)]
        ids = torch.tensor([prompt + p for p in prefixes], device=device)
        pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
        with torch.no_grad():
            logits = target.compute_logits(target(ids, pos)[:, -1])
        hist = None
        if st.penalties is not None:
            hist = TokenHistory.from_ids([prompt] * len(prefixes), prefixes, vocab, device)
        probs = process_logits(logits, st.repeat_interleave(len(prefixes)), hist).double()
        joint = joint * probs.reshape([vocab] * (d + 1) + [1] * (depth - d - 1))
    return joint.flatten().cpu()


def g_test(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a G-test of `counts` against `probs` (cells expected < 5 pooled); fails if an
    outcome of probability zero was observed."""
    from scipy import stats

    expected = probs / probs.sum() * counts.sum()  # float32 transforms: sum is 1 ± 1e-7
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    assert obs[~keep].sum() == 0, "sampled an outcome of probability zero"
    obs, exp = obs[keep].numpy(), exp[keep].numpy()
    exp = exp * (obs.sum() / exp.sum())  # scipy demands equal totals to 1.5e-8
    _, p = stats.power_divergence(obs, exp, lambda_="log-likelihood")
    return float(p)
