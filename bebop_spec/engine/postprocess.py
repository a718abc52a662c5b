"""Appending a step's tokens to a sequence: records, detokenisation and stop conditions."""

from __future__ import annotations

from typing import Any

from bebop_spec.engine.runner import StepResult
from bebop_spec.engine.sequence import Sequence


def append_step(
    seq: Sequence,
    result: StepResult,
    version: int,
    eos_ids: set[int],
    max_model_len: int,
    tokenizer: Any | None,
) -> int:
    """Append result's tokens one by one until a stop condition fires; returns tokens kept."""
    params = seq.params
    kept = 0
    for i, tok in enumerate(result.tokens):
        seq.token_ids.append(tok)
        seq.logprobs.append(result.logprobs[i])
        seq.raw_logprobs.append(result.raw_logprobs[i])
        seq.entropies.append(result.entropies[i])
        if result.top_logprobs is not None:
            seq.top_logprobs.append(result.top_logprobs[i])
        if result.token_ids_logprobs is not None:
            seq.token_ids_logprobs.append(result.token_ids_logprobs[i])
        seq.weight_versions.append(version)
        kept += 1
        if _check_token_stop(seq, tok, eos_ids, max_model_len):
            break
        if params.stop and tokenizer is not None and _check_stop_string(seq, tokenizer):
            break
    return kept


def refresh_text(seq: Sequence, tokenizer: Any | None) -> None:
    """Detokenise lazily, when an output is built (every step when streaming, once at the
    end offline) instead of after every step."""
    if tokenizer is None or seq.text_tokens == len(seq.token_ids):
        return
    if not (seq.is_finished and isinstance(seq.stop_reason, str)):  # else: cut at the stop
        seq.text = _decode(seq, tokenizer)
    seq.text_tokens = len(seq.token_ids)


def _decode(seq: Sequence, tokenizer: Any) -> str:
    return tokenizer.decode(seq.token_ids, skip_special_tokens=seq.params.skip_special_tokens)


def _check_token_stop(seq: Sequence, tok: int, eos_ids: set[int], max_model_len: int) -> bool:
    p = seq.params
    if tok in p.stop_token_ids or not p.ignore_eos and tok in eos_ids:
        seq.finish("stop", tok)
    elif seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish("length")
    return seq.is_finished


def _check_stop_string(seq: Sequence, tokenizer: Any) -> bool:
    """Look for a stop string in the text's tail; truncate the text at the first match."""
    text = _decode(seq, tokenizer)
    longest = max(len(s) for s in seq.params.stop)
    tail_from = max(0, len(seq.text) - longest)
    best: tuple[int, str] | None = None
    for stop in seq.params.stop:
        idx = text.find(stop, tail_from)
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, stop)
    seq.text = text
    if best is None or seq.num_completion_tokens < seq.params.min_tokens:  # vLLM: none before
        return False
    idx, stop = best
    seq.text = text[: idx + len(stop)] if seq.params.include_stop_str_in_output else text[:idx]
    seq.finish("stop", stop)
    return True
