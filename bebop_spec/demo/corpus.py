"""The demo corpus: math word problems, stdlib Python, tool-calling dialogues, as chat dialogues.

    from bebop_spec.demo.corpus import CorpusConfig, build_corpus, load_examples
    build_corpus(CorpusConfig(), seed=0, out_dir=Path("corpus"))
    examples = load_examples(Path("corpus"), "math", "heldout")

Each example is a list of chat messages whose assistant turns are the response; the prompt is
everything before the first assistant turn. Math examples also carry the integer answer.
Output: `{domain}.{split}.jsonl` per domain (math, code, agent) and split (train, heldout).
Everything is a pure function of (config, seed) and, for code, the Python version.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from bebop_spec.demo.agent_task import make_agent_dialogue
from bebop_spec.demo.chat import Message, render_chat
from bebop_spec.demo.code_task import code_pairs
from bebop_spec.demo.math_task import extract_answer, make_math_problem, reward

__all__ = [
    "DOMAINS", "SPLITS", "CorpusConfig", "Example", "build_corpus", "load_examples",
    "make_math_problem", "extract_answer", "reward", "math_examples", "agent_examples",
    "code_examples",
]  # fmt: skip

DOMAINS = ("math", "code", "agent")
SPLITS = ("train", "heldout")


@dataclass
class Example:
    domain: str
    messages: list[Message]
    answer: int | None = None  # math only

    @property
    def prompt_messages(self) -> list[Message]:
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:first]

    @property
    def text(self) -> str:
        return render_chat(self.messages)

    def to_json(self) -> str:
        return json.dumps({"domain": self.domain, "messages": self.messages, "answer": self.answer})

    @classmethod
    def from_json(cls, line: str) -> Example:
        return cls(**json.loads(line))


@dataclass(frozen=True)
class CorpusConfig:
    math_train: int = 10000
    math_heldout: int = 500
    agent_train: int = 1000
    agent_heldout: int = 300
    code_train_chars: int = 850_000
    code_heldout_chars: int = 150_000
    code_max_chars: int = 1500  # longest function (prompt + body) kept

    def __post_init__(self) -> None:
        for name in ("math_train", "math_heldout", "agent_train", "agent_heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.code_train_chars < 1 or self.code_heldout_chars < 1 or self.code_max_chars < 100:
            raise ValueError("code budgets must be positive (code_max_chars >= 100)")


def math_examples(seed: int, n: int, split: str, exclude: set[str] = frozenset()) -> list[Example]:
    """`n` distinct math problems whose question is not in `exclude`."""
    rng = random.Random(f"{seed}:math:{split}")
    out, seen = [], set(exclude)
    while len(out) < n:
        question, solution, answer = make_math_problem(rng)
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": solution}]  # fmt: skip
        out.append(Example("math", messages, answer))
    return out


def agent_examples(seed: int, n: int, split: str, exclude: set[str] = frozenset()) -> list[Example]:
    rng = random.Random(f"{seed}:agent:{split}")
    out, seen = [], set(exclude)
    while len(out) < n:
        messages = make_agent_dialogue(rng)
        key = render_chat(messages)
        if key not in seen:
            seen.add(key)
            out.append(Example("agent", messages))
    return out


def code_examples(seed: int, split: str, budget_chars: int, max_chars: int) -> list[Example]:
    pairs = code_pairs(seed, split == "heldout", budget_chars, max_chars)
    return [
        Example("code", [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
        for p, r in pairs
    ]


def build_examples(cfg: CorpusConfig, seed: int) -> dict[tuple[str, str], list[Example]]:
    """All (domain, split) example lists; held-out math/agent never repeat a training prompt."""
    math_train = math_examples(seed, cfg.math_train, "train")
    agent_train = agent_examples(seed, cfg.agent_train, "train")
    math_seen = {e.messages[0]["content"] for e in math_train}
    return {
        ("math", "train"): math_train,
        ("math", "heldout"): math_examples(seed, cfg.math_heldout, "heldout", math_seen),
        ("agent", "train"): agent_train,
        ("agent", "heldout"): agent_examples(
            seed, cfg.agent_heldout, "heldout", {e.text for e in agent_train}
        ),
        ("code", "train"): code_examples(seed, "train", cfg.code_train_chars, cfg.code_max_chars),
        ("code", "heldout"): code_examples(
            seed, "heldout", cfg.code_heldout_chars, cfg.code_max_chars
        ),
    }


def build_corpus(cfg: CorpusConfig, seed: int, out_dir: Path) -> dict[str, int]:
    """Write every `{domain}.{split}.jsonl`; returns example counts by '{domain}.{split}'."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for (domain, split), examples in build_examples(cfg, seed).items():
        path = out_dir / f"{domain}.{split}.jsonl"
        path.write_text("".join(e.to_json() + "\n" for e in examples), encoding="utf-8")
        counts[f"{domain}.{split}"] = len(examples)
    return counts


def load_examples(corpus_dir: Path, domain: str, split: str) -> list[Example]:
    path = Path(corpus_dir) / f"{domain}.{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [Example.from_json(line) for line in f if line.strip()]
