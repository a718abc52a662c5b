"""Sampling transforms, inverse-CDF sampling and per-row randomness, as batched tensor functions.

Every row of a batch carries its own temperature / top-k / top-p / min-p and nothing here
loops over rows. The same ``process_logits`` is applied to the target's logits (p) and to
the MTP head's logits (q), so both sides of the rejection test use the same transforms
(DESIGN §2). Tests: ``python -m pytest -q tests/spec/test_spec_sampling.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bebop_spec.sampling_params import SamplingParams
from bebop_spec.spec.penalties import PenaltyTensors, TokenHistory, apply_penalties


@dataclass(eq=False)
class SamplingTensors:
    """Per-row sampling parameters of a batch, all shaped [B] on one device."""

    temperature: torch.Tensor  # float32; never divided by on greedy rows
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # float32, 1 = off
    min_p: torch.Tensor  # float32, 0 = off
    greedy: torch.Tensor  # bool
    penalties: PenaltyTensors | None = None  # None: no row reads its token history
    # Whole-batch switches, read once here so process_logits can skip work without a sync.
    any_top_k: bool = field(init=False)
    any_top_p: bool = field(init=False)
    any_min_p: bool = field(init=False)
    any_greedy: bool = field(init=False)
    all_greedy: bool = field(init=False)

    def __post_init__(self) -> None:
        sampled = ~self.greedy
        self.any_top_k = bool(((self.top_k > 0) & sampled).any())
        self.any_top_p = bool(((self.top_p < 1) & sampled).any())
        self.any_min_p = bool(((self.min_p > 0) & sampled).any())
        self.any_greedy = bool(self.greedy.any())
        self.all_greedy = bool(self.greedy.all()) and len(self) > 0

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu",
        eos_ids: Sequence[int] = (),
    ) -> SamplingTensors:  # fmt: skip
        """eos_ids: the model's EOS ids, blocked (with stop_token_ids) below min_tokens."""

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=col([sp.temperature for sp in params], torch.float32),
            top_k=col([sp.effective_top_k for sp in params], torch.long),
            top_p=col([sp.top_p for sp in params], torch.float32),
            min_p=col([sp.min_p for sp in params], torch.float32),
            greedy=col([sp.greedy for sp in params], torch.bool),
            penalties=PenaltyTensors.from_params(params, eos_ids, device),
        )

    def __len__(self) -> int:
        return self.temperature.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> SamplingTensors:
        """Rows ``index`` (a list, a long tensor or a bool mask), in that order."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index, dtype=torch.long)
        index = index.to(self.temperature.device)
        return self._map(lambda t: t[index])

    def repeat_interleave(self, repeats: int | torch.Tensor) -> SamplingTensors:
        """Each row repeated ``repeats`` times in place (e.g. once per chain position)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device | str) -> SamplingTensors:
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> SamplingTensors:
        pen = None if self.penalties is None else self.penalties.map(fn)
        return SamplingTensors(fn(self.temperature), fn(self.top_k), fn(self.top_p),
                               fn(self.min_p), fn(self.greedy), pen)  # fmt: skip


def process_logits(
    logits: torch.Tensor, st: SamplingTensors, history: TokenHistory | None = None
) -> torch.Tensor:
    """logits[B,...,V] -> probs[B,...,V] float32: penalties, temperature, top-k, top-p, min-p,
    renormalised.

    Row b's parameters apply to every position in its ``...`` dims (e.g. a [B,γ,V] chain);
    ``history`` (leading dims [B,...]) is what the penalties read there, needed iff
    ``st.penalties``. Greedy rows are exactly one-hot at the argmax of the penalised logits
    (first index on ties).
    """
    logits = logits.float()
    if st.penalties is not None:
        if history is None:
            raise ValueError("rows with penalties / min_tokens / logit_bias need a TokenHistory")
        logits = apply_penalties(logits, st.penalties, history)
    if st.all_greedy:
        return _one_hot_argmax(logits)
    shape = (logits.shape[0],) + (1,) * (logits.dim() - 1)  # per-row value, broadcast over ...,V
    temperature = torch.where(st.greedy, torch.ones_like(st.temperature), st.temperature)
    scaled = logits / temperature.view(shape)
    if st.any_top_k or st.any_top_p:
        scaled = _mask_top_k_top_p(scaled, st.top_k.view(shape), st.top_p.view(shape))
    probs = torch.softmax(scaled, dim=-1)
    if st.any_min_p:
        # min-p: keep v iff p(v) >= min_p * max_w p(w); the most likely token always survives.
        keep = probs >= st.min_p.view(shape) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if st.any_greedy:
        probs = torch.where(st.greedy.view(shape), _one_hot_argmax(logits), probs)
    return probs


def _mask_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k set, then outside the top-p nucleus.

    logits[B,...,V]; top_k, top_p broadcastable [B,1,...,1]. Both cuts are thresholds on the
    logit value, so tied tokens are kept or dropped together whatever order the sort gives:
    - top-k keeps v iff logit(v) >= the k-th largest logit (k = 0 or k >= V: off);
    - top-p (on the renormalised top-k distribution) keeps v iff the mass of tokens strictly
      more likely than v is < top_p (top_p >= 1: off). The kept sorted prefix is the j with
      exclusive cumsum < top_p; every token tied with its last member is kept too.
    """
    vocab = logits.shape[-1]
    index_shape = logits.shape[:-1] + (1,)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = sorted_logits.gather(-1, (k - 1).expand(index_shape))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))

    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Exclusive cumsum by shifting (monotone, unlike cumsum - probs); entry 0 is 0 < top_p.
    mass_before = sorted_probs.cumsum(dim=-1)[..., :-1]
    mass_before = torch.cat([torch.zeros_like(sorted_probs[..., :1]), mass_before], dim=-1)
    n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True)
    n_keep = torch.where(top_p >= 1, vocab, n_keep)  # rounding must not cut an "off" row
    nucleus = sorted_logits.gather(-1, n_keep - 1)
    threshold = torch.maximum(kth, nucleus)
    return logits.masked_fill(logits < threshold, float("-inf"))


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[...,V] -> float32 one-hot at the first maximal entry."""
    out = torch.zeros_like(logits, dtype=torch.float32)
    return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor, block: int = CDF_BLOCK) -> torch.Tensor:
    """probs[...,V] (>= 0, not necessarily normalised, some entry > 0), u[...] in [0,1) -> ids[...].

    Inverse CDF: the first v with cdf(v) > u * cdf(V-1), found in two levels: float64 totals
    of `block`-token blocks locate the block holding u * total, then a cumsum inside that one
    block the token (the same pick as one cumsum over V up to the rounding of the block
    totals; a float64 cumsum over SmolLM2's 49k-token vocabulary at batch 16 is sequential
    and took 3.4 ms of a 54 ms decode step). A zero-probability v adds exactly 0 to its
    prefix (a zero block to the block prefix), so it can never be the first to exceed, and
    the first entry of a block equals the block's base <= u * total. Rounding of u * total
    can only push the pick past the end of the vocabulary or of its block; those cases are
    clamped to the last positive-probability block / token.
    """
    lead, vocab = probs.shape[:-1], probs.shape[-1]
    rows = probs.reshape(-1, vocab)
    n, nb = rows.shape[0], -(-vocab // block)
    if nb * block != vocab:
        rows = torch.nn.functional.pad(rows, (0, nb * block - vocab))
    blocks = rows.view(n, nb, block)
    sums = blocks.sum(-1, dtype=torch.float64)  # [n, nb]
    bcdf = sums.cumsum(-1)
    target = u.reshape(-1, 1).double() * bcdf[:, -1:]
    b = torch.minimum(
        torch.searchsorted(bcdf, target, right=True).squeeze(-1), _last_positive(sums)
    )
    base = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inner = blocks[torch.arange(n, device=probs.device), b]  # [n, block]
    icdf = base[:, None] + inner.double().cumsum(-1)
    i = torch.minimum(
        torch.searchsorted(icdf, target, right=True).squeeze(-1), _last_positive(inner)
    )
    return (b * block + i).reshape(lead)


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """x[n, m] -> index of each row's last entry > 0 [n]."""
    return x.shape[-1] - 1 - (x > 0).flip(-1).int().argmax(dim=-1)


def logprobs_of(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """probs[...,V], ids[...] -> log probs[ids] [...]; padding ids (< 0) give 0.0."""
    picked = probs.gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.log().masked_fill(ids < 0, 0.0)


def top_logprobs(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs[...,V] -> (logprobs[...,k'], ids[...,k']), the k' = min(k, V) most likely tokens.

    Descending order; tokens cut by top-k/top-p/min-p show as -inf when k exceeds the kept set.
    """
    values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return values.log(), ids


def make_generators(
    seeds: Sequence[int | None], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per row: seeded rows are reproducible, None rows draw OS entropy."""
    generators = []
    for seed in seeds:
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        generators.append(gen)
    return generators


def draw_uniforms(
    generators: Sequence[torch.Generator], k: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """u[B,k] float32 in [0,1), row b drawn only from generators[b] (independent of other rows)."""
    if not generators:
        return torch.empty(0, k, device=device)
    rows = [torch.rand(k, generator=g, device=g.device) for g in generators]
    u = torch.stack(rows)
    return u if device is None else u.to(device)
