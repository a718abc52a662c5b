"""Evaluate the demo target on the held-out corpus; writes `report.json`.

    from bebop_spec.demo.evaluate import EvalConfig, evaluate_target
    report = evaluate_target(model_dir, corpus_dir, EvalConfig(), seed=0, out_path=Path("report.json"))

Reports, per domain, the cross-entropy and the mean entropy (T = 1, nats) of the target's
next-token distribution at held-out *response* positions (assistant turns, including the
closing <|im_end|>), and the math answer accuracy under greedy decoding and T = 1 sampling.
Generation goes through a `GenerateFn`, so the transformers reference can be swapped for the
embedded engine:

    GenerateFn(prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int)
        -> list[list[int]]      # completion ids only (no prompt), in prompt order
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from bebop_spec.demo.chat import assistant_spans
from bebop_spec.demo.corpus import DOMAINS, Example, load_examples
from bebop_spec.demo.math_task import extract_answer

GenerateFn = Callable[[list[list[int]], float, int, int], list[list[int]]]


@dataclass(frozen=True)
class EvalConfig:
    loss_examples: int = 128  # held-out dialogues per domain for loss / entropy
    math_problems: int = 200  # held-out problems for answer accuracy
    math_max_new_tokens: int = 160  # longest held-out solution: 111 tokens
    batch_size: int = 32

    def __post_init__(self) -> None:
        if min(self.loss_examples, self.math_problems, self.batch_size) < 1:
            raise ValueError("loss_examples, math_problems and batch_size must be >= 1")


def _response_batch(tokenizer, examples: list[Example], max_len: int):
    """ids[B,T] (right-padded), attention[B,T], response mask[B,T] (token lies in a reply)."""
    encoded = tokenizer.backend_tokenizer.encode_batch(
        [e.text for e in examples], add_special_tokens=False
    )
    rows = []
    for e, enc in zip(examples, encoded, strict=True):
        spans = assistant_spans(e.messages)
        mask = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
        rows.append((enc.ids[:max_len], mask[:max_len]))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros(len(rows), width, dtype=torch.long)
    resp = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, m) in enumerate(rows):
        ids[i, : len(r)], att[i, : len(r)], resp[i, : len(m)] = torch.tensor(r), 1, torch.tensor(m)
    return ids, att, resp


@torch.no_grad()
def response_stats(model, tokenizer, examples: list[Example], batch_size: int) -> dict:
    """Mean CE and mean T=1 entropy (nats) of p(x_t | x_<t) over response tokens x_t."""
    max_len = model.config.max_position_embeddings
    examples = sorted(examples, key=lambda e: len(e.text))  # similar lengths share a batch
    total_ce = total_h = count = 0.0
    for i in range(0, len(examples), batch_size):
        ids, att, resp = _response_batch(tokenizer, examples[i : i + batch_size], max_len)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()  # [B,T-1,V]
        target, mask = ids[:, 1:], resp[:, 1:]  # position t-1 predicts token t
        logp = F.log_softmax(logits[mask], dim=-1)  # [N,V]
        total_ce -= logp.gather(-1, target[mask][:, None]).sum().item()
        total_h -= (logp.exp() * logp).sum().item()
        count += mask.sum().item()
    if not count:  # every reply truncated away
        return {"loss": None, "entropy": None, "tokens": 0}
    return {"loss": total_ce / count, "entropy": total_h / count, "tokens": int(count)}


def math_accuracy(
    generate_fn: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> dict:
    """Fraction of problems whose completion ends in the right '#### answer', overall and by
    the number of equations in the reference solution (a difficulty proxy)."""
    prompts = [
        tokenizer.apply_chat_template(e.prompt_messages, add_generation_prompt=True, tokenize=False)
        for e in examples
    ]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completions = generate_fn(prompt_ids, temperature, max_new_tokens, seed)
    hits, by_eq = [], defaultdict(list)
    for e, out in zip(examples, completions, strict=True):
        text = tokenizer.decode(out, skip_special_tokens=True)
        hit = extract_answer(text) == e.answer
        hits.append(hit)
        by_eq[e.messages[-1]["content"].count(" = ")].append(hit)
    formatted = sum(extract_answer(tokenizer.decode(o)) is not None for o in completions)
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "answer_format_rate": formatted / len(hits),
        "accuracy_by_equations": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_eq.items())},
    }


def hf_generate_fn(model, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32) -> GenerateFn:
    """Reference `GenerateFn` on transformers `generate` (left padding, stops at eos ids)."""
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])

    @torch.no_grad()
    def generate(prompts, temperature, max_new_tokens, seed):
        torch.manual_seed(seed)
        outs = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
            att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            gen = model.generate(
                input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )  # fmt: skip
            for row in gen[:, width:].tolist():
                end = next((j for j, t in enumerate(row) if t in stop), len(row))
                outs.append(row[:end])
        return outs

    return generate


def evaluate_target(
    model_dir: Path,
    corpus_dir: Path,
    cfg: EvalConfig,
    seed: int,
    out_path: Path,
    generate_fn: GenerateFn | None = None,
    progress: bool = True,
) -> dict:
    """Held-out loss / entropy per domain + math accuracy (greedy, T=1) -> `out_path` JSON."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generate_fn = generate_fn or hf_generate_fn(model, tokenizer, cfg.batch_size)
    tasks = [*DOMAINS, "math greedy", "math T=1"]
    bar = tqdm(tasks, desc="evaluate", disable=not progress, dynamic_ncols=True)
    report: dict = {"heldout": {}, "math_accuracy": {}}
    for task in bar:
        bar.set_postfix(task=task)
        if task in DOMAINS:
            examples = load_examples(corpus_dir, task, "heldout")[: cfg.loss_examples]
            report["heldout"][task] = response_stats(model, tokenizer, examples, cfg.batch_size)
        else:
            problems = load_examples(corpus_dir, "math", "heldout")[: cfg.math_problems]
            temperature = 0.0 if task.endswith("greedy") else 1.0
            report["math_accuracy"][task.split()[1]] = math_accuracy(
                generate_fn, tokenizer, problems, temperature, cfg.math_max_new_tokens, seed
            )
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
