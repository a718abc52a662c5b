"""Self-distillation data: responses sampled from the target at the RL temperature.

    cfg = DataConfig(model="path/to/target", out="data/train", num_prompts=256,
                     temperature=1.0, max_tokens=256, domains=("math", "code", "agent"))
    meta = generate_dataset(cfg)              # -> data/train/{data.safetensors, meta.json}

Prompts come from the demo corpus (`bebop_spec.demo.corpus`: `{domain}.{split}.jsonl` in the
corpus directory, or generated on the fly by the corpus module when no corpus is built) or from
a JSONL file of user prompts, one object per line with `messages` (chat, rendered with the
tokenizer's chat template and a generation prompt), `prompt` (text, used as is) or
`input_ids`, and an optional `domain`. Each response is sampled by the embedded engine without
speculation (`LLM(..., draft_mode=None)`); the stored sequence is prompt + response with the
loss mask on the response tokens (including a final end-of-sequence token).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bebop_spec.train.data import DatasetMeta, DistillSample, write_dataset

DEMO_DOMAINS = ("math", "code", "agent")
SPLITS = ("train", "heldout")


@dataclass
class DataConfig:
    model: str  # target checkpoint directory (with its tokenizer unless `tokenizer` is given)
    out: str  # dataset directory to write
    num_prompts: int = 256  # prompts per domain (at most this many from a --prompts file)
    temperature: float = 1.0  # the RL sampling temperature
    top_p: float = 1.0
    max_tokens: int = 256  # response length cap
    domains: tuple[str, ...] = DEMO_DOMAINS
    prompts: str | None = None  # JSONL of user prompts instead of the demo corpus
    split: str = "train"  # demo-corpus split: train | heldout
    corpus: str | None = None  # demo corpus directory; None: the demo cache, else on the fly
    tokenizer: str | None = None  # tokenizer directory; None: the model's own
    samples_per_prompt: int = 1
    seed: int = 0
    max_num_seqs: int = 64  # engine batch
    max_model_len: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.domains = tuple(self.domains)
        checks = [
            ("num_prompts", self.num_prompts >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0 (self-distillation samples)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("split", self.split in SPLITS, f"must be one of {SPLITS}"),
            ("samples_per_prompt", self.samples_per_prompt >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("domains", self.prompts is not None or bool(self.domains), "must not be empty"),
        ]
        if self.prompts is None:
            bad = [d for d in self.domains if d not in DEMO_DOMAINS]
            checks.append(("domains", not bad, f"has unknown {bad}; choose from {DEMO_DOMAINS}"))
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r} {why}")


@dataclass
class Prompt:
    domain: str
    messages: list[dict] | None = None  # chat messages before the first assistant turn
    text: str | None = None  # raw text, used as is
    input_ids: list[int] | None = None


# ---------------------------------------------------------------- prompt sources


def demo_corpus_dir(corpus: str | Path | None = None) -> Path | None:
    """The corpus directory to read: `corpus`, else the demo cache's if it is built, else None."""
    if corpus is not None:
        path = Path(corpus)
        if not path.is_dir():
            raise ValueError(f"corpus directory {path} does not exist")
        return path
    from bebop_spec.demo.build import DemoBuildConfig

    path = DemoBuildConfig().corpus_dir
    return path if any(path.glob("*.jsonl")) else None


def _generated_examples(domain: str, split: str, n: int, seed: int) -> list:
    """The corpus module's own generators, when no corpus directory is built (a few seconds).
    Held-out math / agent prompts generated this way are not de-duplicated against train."""
    from bebop_spec.demo import corpus as c

    if domain == "math":
        return c.math_examples(seed, n, split)
    if domain == "agent":
        return c.agent_examples(seed, n, split)
    return c.code_examples(seed, split, budget_chars=n * 1500, max_chars=1500)[:n]


def corpus_prompts(
    domains: tuple[str, ...], n: int, split: str, seed: int, corpus: str | Path | None = None
) -> list[Prompt]:
    """n prompts per domain from the demo corpus split, a seeded random subset of the file."""
    from bebop_spec.demo.corpus import load_examples

    directory = demo_corpus_dir(corpus)
    out = []
    for domain in domains:
        if directory is not None:
            path = directory / f"{domain}.{split}.jsonl"
            if not path.is_file():
                raise ValueError(f"corpus {directory}: no {path.name}")
            examples = load_examples(directory, domain, split)
            random.Random(f"{seed}:{domain}").shuffle(examples)
        else:
            examples = _generated_examples(domain, split, n, seed=0)  # the demo corpus seed
        out += [Prompt(domain, messages=e.prompt_messages) for e in examples[:n]]
    return out


def _parse_prompt_line(obj: Any, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    domain = str(obj.get("domain", "user"))
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError(f"{where}: messages must be objects with role and content")
        return Prompt(domain, messages=msgs)
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return Prompt(domain, text=obj["prompt"])
    ids = obj.get("input_ids")
    if isinstance(ids, list) and ids and all(isinstance(t, int) and t >= 0 for t in ids):
        return Prompt(domain, input_ids=ids)
    raise ValueError(
        f"{where}: needs a non-empty 'messages' list, 'prompt' string or 'input_ids' list"
    )


def file_prompts(path: str | Path, n: int) -> list[Prompt]:
    """The first n prompts of a JSONL file (see the module docstring for the line format)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            out.append(_parse_prompt_line(obj, f"{path}:{lineno}"))
            if len(out) >= n:
                break
    if not out:
        raise ValueError(f"prompts file {path} holds no prompts")
    return out


# ---------------------------------------------------------------- tokenisation


def check_tokenizer(tokenizer: Any, vocab_size: int, where: str) -> None:
    """ValueError if the tokenizer can produce ids the model has no embedding for."""
    if tokenizer is None:
        return
    size = len(tokenizer)
    if size > vocab_size:
        raise ValueError(
            f"tokenizer {where} has {size} tokens but the model's vocabulary is {vocab_size}: "
            "tokenizer and model do not match"
        )


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages get the chat template plus a generation prompt."""
    if prompt.input_ids is not None:
        return list(prompt.input_ids)
    if tokenizer is None:
        raise ValueError("text / chat prompts need a tokenizer (the model directory has none)")
    if prompt.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                prompt.messages, tokenize=False, add_generation_prompt=True
            )
        else:
            from bebop_spec.demo.chat import render_chat  # the demo's ChatML rule

            text = render_chat(prompt.messages, add_generation_prompt=True)
    else:
        text = prompt.text
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_ids(ids: list[int], vocab_size: int, where: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"{where}: token id {bad} is outside the model's vocabulary ({vocab_size}): "
            "tokenizer and model do not match"
        )


# ---------------------------------------------------------------- generation


def load_prompts(cfg: DataConfig) -> list[Prompt]:
    """cfg's prompts: the first num_prompts of its prompts file, else the demo corpus's."""
    if cfg.prompts is not None:
        return file_prompts(cfg.prompts, cfg.num_prompts)
    return corpus_prompts(cfg.domains, cfg.num_prompts, cfg.split, cfg.seed, cfg.corpus)


def encode_prompts(prompts: list[Prompt], tokenizer: Any, limit: int | None,
                   vocab_size: int | None = None) -> tuple[list[Prompt], list[list[int]], int]:  # fmt: skip
    """(kept prompts, their ids, number skipped): a prompt is skipped when empty or when it
    leaves no room for a response of >= 2 tokens in a context of `limit` (None: no limit)."""
    kept, encoded, skipped = [], [], 0
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p)
        if vocab_size is not None:
            _check_ids(ids, vocab_size, f"prompt {i} ({p.domain})")
        if not ids or (limit is not None and len(ids) >= limit - 1):
            skipped += 1
            continue
        kept.append(p)
        encoded.append(ids)
    if not kept:
        too_long = "" if limit is None else f" or >= {limit - 1} tokens"
        raise ValueError(f"no usable prompt: all {len(prompts)} are empty{too_long}")
    return kept, encoded, skipped


def prompt_seed(seed: int, i: int) -> int:
    """Seed of kept prompt i's request; its n samples derive theirs from it (SamplingParams)."""
    return seed * 1_000_003 + i


def distill_sample(prompt_ids: list[int], response_ids: list[int], domain: str) -> DistillSample:
    """Prompt + response with the loss on the response (its final EOS included when sampled)."""
    ids = list(prompt_ids) + list(response_ids)
    return DistillSample(ids, [0] * len(prompt_ids) + [1] * len(response_ids), domain)


def provenance(cfg: DataConfig, skipped: int, finish: list[str]) -> dict[str, Any]:
    """meta.json `extra` of a dataset made from cfg: where its prompts came from and how its
    responses were sampled and ended."""
    return {
        "source": cfg.prompts or f"demo corpus ({cfg.split})",
        "split": cfg.split,
        "max_tokens": cfg.max_tokens,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "skipped_prompts": skipped,
        "finish_reasons": {r: finish.count(r) for r in sorted(set(map(str, finish)))},
    }


def generate_dataset(cfg: DataConfig, progress: bool = True) -> DatasetMeta:
    """Sample responses for every prompt and write the dataset to cfg.out; returns its meta."""
    from bebop_spec import LLM, SamplingParams
    from bebop_spec.models import load_tokenizer

    prompts = load_prompts(cfg)
    llm = LLM(cfg.model, draft_mode=None, max_num_seqs=cfg.max_num_seqs,
              max_model_len=cfg.max_model_len, dtype=cfg.dtype, device=cfg.device,
              seed=cfg.seed)  # fmt: skip
    vocab = llm.engine.model_config.vocab_size
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else llm.tokenizer
    check_tokenizer(tokenizer, vocab, cfg.tokenizer or cfg.model)
    kept, encoded, skipped = encode_prompts(prompts, tokenizer, llm.engine.max_model_len, vocab)
    params = [
        SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            n=cfg.samples_per_prompt,
            seed=prompt_seed(cfg.seed, i),
        )  # fmt: skip
        for i in range(len(kept))
    ]
    outputs = llm.generate(encoded, params, use_tqdm=progress)
    finish = [c.finish_reason for o in outputs for c in o.outputs]
    samples = (
        distill_sample(o.prompt_token_ids, c.token_ids, p.domain)
        for o, p in zip(outputs, kept, strict=True)
        for c in o.outputs
    )
    return write_dataset(cfg.out, samples, model=str(cfg.model), temperature=cfg.temperature,
                         extra=provenance(cfg, skipped, finish))  # fmt: skip


def prompts_of(ds, domain: str | None = None, limit: int = 0) -> list[list[int]]:
    """The prompt ids (tokens before the first loss-mask token) of a dataset's sequences, for
    measuring with the engine on held-out data; only `domain` if given, at most `limit`."""
    names = ds.meta.domains
    out = []
    for i in range(len(ds)):
        if domain is not None and names[int(ds.domain[i])] != domain:
            continue
        ids, mask = ds.sequence(i)
        first = int(mask.nonzero()[0]) if mask.any() else len(ids)
        if first > 0:
            out.append(ids[:first].tolist())
    return out[:limit] if limit else out


__all__ = [
    "DEMO_DOMAINS",
    "DataConfig",
    "Prompt",
    "check_tokenizer",
    "corpus_prompts",
    "distill_sample",
    "encode_prompt",
    "encode_prompts",
    "file_prompts",
    "generate_dataset",
    "load_prompts",
    "prompt_seed",
    "prompts_of",
    "provenance",
]
