"""Byte-level BPE tokenizer for the demo model, trained on the demo corpus.

    from bebop_spec.demo.tokenizer import TokenizerConfig, train_tokenizer
    tok = train_tokenizer(TokenizerConfig(), corpus_dir, out_dir)   # a PreTrainedTokenizerFast
    tok.apply_chat_template(messages, add_generation_prompt=True)

Pre-tokenisation is Qwen2's regex (digits split one by one, so arithmetic stays digit-wise)
followed by the byte-level map; no normaliser, so decode(encode(s)) == s for any string.
Special tokens: <|endoftext|> 0 (document separator), <|im_start|> 1, <|im_end|> 2 (eos),
<|pad|> 3. Default vocabulary: 4096 (see docs/demo.md for the measured trade-off).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bebop_spec.demo.chat import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, PAD, SPECIAL_TOKENS
from bebop_spec.demo.corpus import DOMAINS, load_examples

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    model_max_length: int = 1024

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials)"
            )


def _segments(texts: Iterable[str]) -> Iterator[str]:
    """The text between special tokens: exactly the pieces the BPE model will see."""
    for text in texts:
        yield from (s for s in _SPECIAL_RE.split(text) if s)


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, show_progress: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_segments(texts), trainer)
    return tok


def wrap(tok: Tokenizer, cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Hugging Face wrapper: eos = <|im_end|>, pad = <|pad|>, ChatML chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[ENDOFTEXT, IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=cfg.model_max_length,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    cfg: TokenizerConfig, corpus_dir: Path, out_dir: Path, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Train on every training split of the corpus and `save_pretrained` into `out_dir`."""
    texts = (e.text for d in DOMAINS for e in load_examples(corpus_dir, d, "train"))
    hf = wrap(train_bpe(texts, cfg, show_progress), cfg)
    hf.save_pretrained(out_dir)
    _portable_class_name(Path(out_dir) / "tokenizer_config.json")
    return hf


def _portable_class_name(config_path: Path) -> None:
    """transformers 5 writes its new class name and a list of `extra_special_tokens`; 4.x (and
    engines pinned to it) know only the old spellings, which 5.x still reads the same way."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
