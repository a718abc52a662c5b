"""The RL task of the GRPO example: the demo's arithmetic word problems, verifiable reward.

    problems = step_problems(tokenizer, seed=0, step=3, count=8, max_ops=2)
    rewards = [task_reward(s.text, p.answer) for s in group]      # 1.0 iff '#### <answer>'

Prompts are a pure function of (seed, step): every run with the same seed sees the same
problems in the same order, whatever the draft mode (the RL study relies on this).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from bebop_spec.demo.math_task import make_math_problem
from bebop_spec.demo.math_task import reward as math_reward


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    prompt_ids: list[int]  # the chat-formatted prompt, ending with the assistant header


def encode_prompt(tokenizer: Any, question: str) -> list[int]:
    """One user turn in the tokenizer's chat template, with the generation prompt."""
    messages = [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # plain-text fallback for tokenizers without a template
        text = f"Question: {question}\nAnswer:"
    return list(tokenizer.encode(text, add_special_tokens=False))


def step_problems(tokenizer: Any, seed: int, step: int, count: int, max_ops: int = 2,
                  level: int | None = 0) -> list[Problem]:  # fmt: skip
    """`count` problems of 1..max_ops operations for RL step `step` (numbers up to
    NUMBER_CAPS[level]; None: any size)."""
    if not 1 <= max_ops <= 4:
        raise ValueError(f"max_ops must be in 1..4, got {max_ops}")
    rng = random.Random(f"{seed}:grpo:{step}")
    out = []
    for _ in range(count):
        question, _, answer = make_math_problem(rng, num_steps=rng.randint(1, max_ops), level=level)
        out.append(Problem(question, answer, encode_prompt(tokenizer, question)))
    return out


def task_reward(text: str, answer: int) -> float:
    """1.0 when the completion's final '#### n' equals the answer, else 0.0."""
    return math_reward(text, answer)
