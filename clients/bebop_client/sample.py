"""One sample = one SGLang-native `/generate` request (token ids in, token ids out).

body = generate_body(prompt_ids, {"temperature": 1.0, "max_new_tokens": 256}, rid="r0")
sample = parse_sample(reply_json, prompt_ids, rid="r0", server=url)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bebop_client.errors import ProtocolError


@dataclass
class Sample:
    """A finished completion with everything a policy-gradient step needs."""

    rid: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the weights that sampled it
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""
    matched_stop: int | str | None = None  # the stop token / string that ended it
    weight_version: str | None = None  # label serving when the sample finished
    weight_versions: list[str] = field(default_factory=list)  # per token
    spec_accept_rate: float | None = None  # accepted / proposed drafts (None: no drafting)
    spec_accept_length: float | None = None  # tokens per verification step
    spec_verify_ct: int = 0  # verification steps
    server: str = ""
    meta_info: dict[str, Any] = field(default_factory=dict)  # the raw reply's meta_info

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def mixed_versions(self) -> bool:
        """True when a weight update landed while this sample was being generated."""
        return len(set(self.weight_versions)) > 1


def generate_body(
    prompt_ids: Sequence[int], sampling_params: Mapping[str, Any] | None, rid: str,
    *, return_logprob: bool = True, stream: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The JSON body of one single-sample /generate request."""
    if not prompt_ids or not all(isinstance(t, int) and t >= 0 for t in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-negative ints")
    params = dict(sampling_params or {})
    if params.get("n", 1) != 1:
        raise ValueError("sampling_params.n must be 1: ask for n samples with generate(n=...)")
    params.pop("n", None)
    return {"input_ids": list(prompt_ids), "sampling_params": params, "rid": rid,
            "return_logprob": return_logprob, "stream": stream}  # fmt: skip


def sample_params(base: Mapping[str, Any] | None, index: int) -> dict[str, Any]:
    """Params of sample `index` of a group: a `sampling_seed` becomes seed + index, so a
    seeded group is reproducible yet its samples differ."""
    params = dict(base or {})
    if params.get("sampling_seed") is not None:
        params["sampling_seed"] = int(params["sampling_seed"]) + index
    return params


def expand_versions(spans: Any, num_tokens: int, fallback: str | None) -> list[str]:
    """SGLang-style `[{version, start, end}]` spans -> one label per token."""
    if not spans:
        return [str(fallback)] * num_tokens if fallback is not None else []
    out: list[str] = []
    for s in spans:
        if isinstance(s, dict):
            out += [str(s["version"])] * (int(s["end"]) - int(s["start"]))
        else:  # already one label per token
            out.append(str(s))
    if len(out) != num_tokens:
        raise ProtocolError(f"weight_versions cover {len(out)} tokens, output has {num_tokens}")
    return out


def _finish(meta: Mapping[str, Any]) -> tuple[str, Any]:
    fr = meta.get("finish_reason")
    if isinstance(fr, dict):
        return str(fr.get("type", "abort")), fr.get("matched")
    if isinstance(fr, str):
        return fr, None
    return "abort", None  # SGLang reports None for a request that never finished


def parse_sample(reply: Any, prompt_ids: Sequence[int], rid: str, server: str = "") -> Sample:
    """A /generate reply for one sample -> Sample (ProtocolError on an unexpected shape)."""
    if isinstance(reply, list) and len(reply) == 1:
        reply = reply[0]
    if not isinstance(reply, dict) or "output_ids" not in reply or "meta_info" not in reply:
        raise ProtocolError(f"unexpected /generate reply: {str(reply)[:200]}")
    meta = reply["meta_info"] or {}
    ids = [int(t) for t in reply["output_ids"]]
    triples = meta.get("output_token_logprobs") or []
    if triples and len(triples) != len(ids):
        raise ProtocolError(f"{len(triples)} logprobs for {len(ids)} output tokens")
    reason, matched = _finish(meta)
    version = meta.get("weight_version")
    return Sample(
        rid=rid,
        prompt_ids=list(prompt_ids),
        token_ids=ids,
        logprobs=[float(t[0]) for t in triples],
        finish_reason=reason,
        text=reply.get("text") or "",
        matched_stop=matched,
        weight_version=None if version is None else str(version),
        weight_versions=expand_versions(meta.get("weight_versions"), len(ids), version),
        spec_accept_rate=meta.get("spec_accept_rate"),
        spec_accept_length=meta.get("spec_accept_length"),
        spec_verify_ct=int(meta.get("spec_verify_ct") or 0),
        server=server,
        meta_info=meta,
    )
