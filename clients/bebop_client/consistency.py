"""Trainer / server logprob consistency: recompute each rollout's logprobs with the trainer's
model and report how far they are from what the server reported.

    from bebop_client.consistency import check_rollouts
    report = check_rollouts(samples, model, temperature=1.0)   # or (client, model, prompts=...)
    print(report.table()); open("mismatch.json", "w").write(report.to_json())

    PYTHONPATH=clients python -m bebop_client.consistency --url http://127.0.0.1:30000 \
        --model HF_DIR --prompts prompts.txt --n 4 --max-new-tokens 64 --temperature 1.0

The server's `output_token_logprobs` are log p(token) under the *processed* distribution it
sampled from: softmax(logits / T) (then top-k / top-p / min-p, renormalised). So the trainer
must recompute at the same temperature, and the comparison is exact only when no top-k /
top-p / min-p cut was active. Torch (and transformers, for the CLI) are imported lazily:
the client package itself does not need them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


@dataclass
class MismatchStats:
    """|Δ| = |trainer − server| logprob and the importance ratio exp(trainer − server)."""

    num_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    ratio_quantiles: dict[str, float]  # "p1", "p5", "p50", "p95", "p99" -> ratio
    num_flagged: int  # tokens with |Δ| > threshold
    log_ratio_sum: float  # Σ (trainer − server): the sequence-level log importance ratio

    @classmethod
    def of(cls, delta: np.ndarray, threshold: float) -> MismatchStats:
        """delta[N] = trainer − server logprobs (N may be 0: every number is then NaN)."""
        if delta.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, {_qname(q): nan for q in QUANTILES}, 0, 0.0)
        ratio = np.exp(delta)
        qs = np.quantile(ratio, QUANTILES)  # linear interpolation between order statistics
        return cls(
            num_tokens=int(delta.size),
            max_abs_diff=float(np.abs(delta).max()),
            mean_abs_diff=float(np.abs(delta).mean()),
            ratio_quantiles={_qname(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
            num_flagged=int((np.abs(delta) > threshold).sum()),
            log_ratio_sum=float(delta.sum()),
        )


@dataclass
class FlaggedToken:
    rollout: int
    position: int  # index in the completion
    token_id: int | None
    trainer_logprob: float
    server_logprob: float

    @property
    def diff(self) -> float:
        return self.trainer_logprob - self.server_logprob


@dataclass
class MismatchReport:
    """Per-rollout and overall mismatch, plus every token whose |Δ| exceeds `threshold`."""

    threshold: float
    overall: MismatchStats
    rollouts: list[MismatchStats]
    flagged: list[FlaggedToken] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f, tok in zip(d["flagged"], self.flagged, strict=True):
            f["diff"] = tok.diff
        return d

    def to_json(self, indent: int | None = 2) -> str:
        # NaN (an empty rollout) is not JSON: write null.
        return json.dumps(_nan_to_none(self.to_dict()), indent=indent)

    def table(self, max_rows: int = 20) -> str:
        """A fixed-width text table: one row per rollout (first `max_rows`), then overall."""
        head = f"{'rollout':>8} {'tokens':>6} {'max|Δ|':>9} {'mean|Δ|':>9} " + " ".join(
            f"{'r_' + _qname(q):>7}" for q in QUANTILES
        ) + f" {'flagged':>7}"  # fmt: skip
        rows = [head]
        for i, s in enumerate(self.rollouts[:max_rows]):
            rows.append(_row(str(i), s))
        if len(self.rollouts) > max_rows:
            rows.append(f"{'...':>8} ({len(self.rollouts) - max_rows} more rollouts)")
        rows.append(_row("all", self.overall))
        rows.append(f"flagged: |Δ| > {self.threshold:g} on {self.overall.num_flagged} tokens")
        return "\n".join(rows)


def logprob_mismatch(
    trainer_logprobs: Sequence[Sequence[float]],
    server_logprobs: Sequence[Sequence[float]],
    *,
    threshold: float = 0.1,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> MismatchReport:
    """Rollouts' per-token logprobs (trainer's, server's; same lengths) -> MismatchReport."""
    if len(trainer_logprobs) != len(server_logprobs):
        raise ValueError(f"{len(trainer_logprobs)} trainer rollouts, {len(server_logprobs)} server")
    deltas, flagged = [], []
    for r, (t, s) in enumerate(zip(trainer_logprobs, server_logprobs, strict=True)):
        t, s = np.asarray(t, dtype=np.float64), np.asarray(s, dtype=np.float64)
        if t.shape != s.shape:
            raise ValueError(f"rollout {r}: {t.size} trainer logprobs, {s.size} server logprobs")
        delta = t - s
        deltas.append(delta)
        for j in np.flatnonzero(np.abs(delta) > threshold):
            tok = None if token_ids is None else int(token_ids[r][j])
            flagged.append(FlaggedToken(r, int(j), tok, float(t[j]), float(s[j])))
    every = np.concatenate(deltas) if deltas else np.zeros(0)
    return MismatchReport(
        threshold=threshold,
        overall=MismatchStats.of(every, threshold),
        rollouts=[MismatchStats.of(d, threshold) for d in deltas],
        flagged=flagged,
    )


def recompute_logprobs(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    batch_size: int = 8,
    device: Any = None,
) -> list[list[float]]:
    """log softmax(logits / T) of each completion token given its prompt and the tokens before.

    `model`: a transformers causal LM (called with input_ids + attention_mask) or any callable
    ids[B, L] -> logits[B, L, V] (or an object with `.logits`). It runs as it is, on its own
    device and dtype (`device` overrides where the ids go); the softmax is taken in float32.
    """
    import torch

    if not temperature > 0:
        raise ValueError("temperature must be > 0 (at T = 0 every sampled token has logprob 0)")
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    dev = device if device is not None else _device_of(model)
    out: list[list[float]] = []
    with torch.no_grad():
        for lo in range(0, len(prompt_ids), batch_size):
            hi = lo + batch_size
            pairs = list(zip(prompt_ids[lo:hi], completion_ids[lo:hi], strict=True))
            out += _batch_logprobs(model, pairs, temperature, dev)
    return out


def _batch_logprobs(model: Any, pairs: list, temperature: float, dev: Any) -> list[list[float]]:
    """One right-padded forward: completion token j of row b is predicted at P_b + j − 1.
    Right padding keeps every real position's causal logits exact even without a mask."""
    import torch

    seqs = [list(p) + list(c) for p, c in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    logits = _logits(model, ids, mask)  # [B, L, V]
    res = []
    for b, (p, c) in enumerate(pairs):
        if not c:
            res.append([])
            continue
        rows = logits[b, len(p) - 1 : len(p) + len(c) - 1].float() / temperature  # [C, V]
        tok = torch.as_tensor(list(c), device=rows.device)
        res.append(torch.log_softmax(rows, -1).gather(-1, tok[:, None]).squeeze(-1).tolist())
    return res


def _logits(model: Any, ids: Any, mask: Any) -> Any:
    if hasattr(model, "config") and hasattr(model, "forward"):  # transformers PreTrainedModel
        out = model(input_ids=ids, attention_mask=mask)
    else:
        out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, tuple | list) else out


def _device_of(model: Any) -> Any:
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return "cpu"


def check_rollouts(
    client_or_samples: Any,
    model: Any,
    prompts: Sequence[Sequence[int]] | None = None,
    *,
    sampling_params: Mapping[str, Any] | None = None,
    n: int = 1,
    temperature: float | None = None,
    threshold: float = 0.1,
    batch_size: int = 8,
) -> MismatchReport:
    """Compare the server's logprobs with `model`'s on rollouts.

    `client_or_samples`: a RolloutClient (then `prompts` are sampled n times each with
    `sampling_params`) or finished samples: `Sample`s, groups of them (lists), or mappings
    with prompt_ids / token_ids / logprobs. `temperature` defaults to sampling_params'
    (1.0 when neither says).
    """
    params = dict(sampling_params or {})
    if temperature is None:
        temperature = float(params.get("temperature", 1.0))
    if hasattr(client_or_samples, "generate_batch"):
        if prompts is None:
            raise ValueError("check_rollouts(client, ...) needs prompts")
        params["temperature"] = temperature
        groups = client_or_samples.generate_batch(prompts, params, n=n)
        samples = [s for g in groups for s in g]
    else:
        samples = list(_flatten(client_or_samples))
    prompt_ids = [list(_field(s, "prompt_ids")) for s in samples]
    token_ids = [list(_field(s, "token_ids")) for s in samples]
    server = [list(_field(s, "logprobs")) for s in samples]
    trainer = recompute_logprobs(model, prompt_ids, token_ids, temperature, batch_size)
    return logprob_mismatch(trainer, server, threshold=threshold, token_ids=token_ids)


def _flatten(items: Iterable[Any]) -> Iterable[Any]:
    for x in items:
        if isinstance(x, list | tuple):
            yield from _flatten(x)
        else:
            yield x


def _field(sample: Any, name: str) -> Any:
    if isinstance(sample, Mapping):
        return sample[name]
    return getattr(sample, name)


def _qname(q: float) -> str:
    return f"p{q * 100:g}"


def _row(label: str, s: MismatchStats) -> str:
    qs = " ".join(f"{s.ratio_quantiles[_qname(q)]:>7.4f}" for q in QUANTILES)
    return (f"{label:>8} {s.num_tokens:>6} {s.max_abs_diff:>9.2e} {s.mean_abs_diff:>9.2e} "
            f"{qs} {s.num_flagged:>7}")  # fmt: skip


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


# ---------------------------------------------------------------------- CLI
def read_prompts(specs: Sequence[str], tokenizer: Any = None) -> list[list[int]]:
    """Each spec is a file (one prompt per line) or an inline prompt; a prompt is a JSON list
    of token ids or text (encoded with `tokenizer`)."""
    import os

    lines: list[str] = []
    for spec in specs:
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                lines += [x.rstrip("\n") for x in f if x.strip()]
        else:
            lines.append(spec)
    out = []
    for line in lines:
        if line.lstrip().startswith("["):
            out.append([int(t) for t in json.loads(line)])
        elif tokenizer is None:
            raise ValueError(f"text prompt {line[:40]!r} needs a tokenizer in the model dir")
        else:
            out.append(list(tokenizer.encode(line)))
    return out


def run(argv: Sequence[str] | None = None) -> MismatchReport:
    """The CLI: sample, recompute, print the table, write the JSON; returns the report."""
    ap = argparse.ArgumentParser(prog="python -m bebop_client.consistency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--url", action="append", required=True, help="server URL (repeatable)")
    ap.add_argument("--model", required=True, help="HF model dir (or hub id) the trainer uses")
    ap.add_argument(
        "--prompts",
        action="append",
        required=True,
        help="file with one prompt per line, or an inline prompt (repeatable)",
    )
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threshold", type=float, default=0.1, help="flag tokens with |Δ| above")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="trainer dtype: float32 | bfloat16 | ...")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", default="logprob_mismatch.json", help="where to write the report")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bebop_client.client import RolloutClient

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    prompts = read_prompts(args.prompts, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    sp = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    with RolloutClient(args.url, api_key=args.api_key) as client:
        report = check_rollouts(client, model, prompts, sampling_params=sp, n=args.n,
                                threshold=args.threshold, batch_size=args.batch_size)  # fmt: skip
    print(report.table())
    with open(args.json, "w", encoding="utf-8") as f:
        f.write(report.to_json())
    print(f"report: {args.json}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
