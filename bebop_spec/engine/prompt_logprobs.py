"""Prompt scoring: log p(x_i | x_<i) of prompt tokens from a prefill's hiddens, in chunks.

Scores are under the raw model (log softmax of the unprocessed logits, T = 1), as vLLM's
prompt logprobs and SGLang's input logprobs are: a prompt is not sampled, so there is no
sampling distribution to score it under. A [prompt_len, vocab] logits tensor for a long prompt
is what runs servers out of memory (SmolLM2: 49 k vocab × 8 k positions × 4 B = 1.6 GB); rows
are scored `chunk` at a time, so the peak is chunk × vocab floats whatever the prompt length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bebop_spec.engine.outputs import PromptLogprobs

CHUNK = 256  # rows of logits alive at once


def score_prompt(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    start: int,
    top_k: int = 0,
    token_ids: list[int] | None = None,
    chunk: int = CHUNK,
) -> PromptLogprobs:
    """hidden[N, H] row t predicts targets[N] entry t (prompt position start + t) → its logprob,
    rank (1 + tokens likelier), the top_k likeliest tokens and the logprobs of `token_ids`."""
    lps: list[float] = []
    ranks: list[int] = []
    tops: list[dict[int, float]] = []
    chosen: list[dict[int, float]] | None = [] if token_ids else None
    ids = torch.tensor(token_ids or [], dtype=torch.long, device=hidden.device)
    for a in range(0, hidden.shape[0], chunk):
        logp = torch.log_softmax(compute_logits(hidden[a : a + chunk]).float(), -1)  # [n, V]
        lp = logp.gather(-1, targets[a : a + chunk, None])  # [n, 1]
        lps += lp[:, 0].tolist()
        ranks += ((logp > lp).sum(-1) + 1).tolist()
        if top_k:
            v, i = logp.topk(min(top_k, logp.shape[-1]), -1)
            tops += [dict(zip(r_i, r_v, strict=True)) for r_i, r_v in zip(i.tolist(), v.tolist(),
                                                                          strict=True)]  # fmt: skip
        else:
            tops += [{} for _ in range(logp.shape[0])]
        if chosen is not None:
            chosen += [dict(zip(token_ids, row, strict=True)) for row in logp[:, ids].tolist()]
    return PromptLogprobs(start, lps, ranks, tops, chosen)
