"""Model runner: owns the tensors (weights, KV caches) and runs prefill / decode / spec steps.

Positions and caches follow docs/architecture.md. One speculative step for a batch:

    1. MTP catch-up: feed the head the pending pairs (h_j, x_{j+1}); its output at the last
       pair gives q_1, a draft d_1 is drawn; steps k = 2..γ feed (g_{k-1}, d_{k-1}).
    2. Target verify: [x_{n-1}, d_1..d_γ] in one forward → p_1..p_{γ+1}.
    3. `verify_chain` accepts a prefix and emits one more token (residual or bonus).
    4. Bookkeeping: the target cache is valid up to the last accepted draft (rollback is the
       length pointer), and the hiddens of the a+1 newly valid positions become pending pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.prompt_logprobs import score_prompt
from bebop_spec.engine.sequence import Sequence
from bebop_spec.engine.weights import tied_aliases
from bebop_spec.errors import WeightUpdateError
from bebop_spec.hardware import kv_budget_bytes
from bebop_spec.models import LoadedModel, PagedKVCache
from bebop_spec.models.layers import fuse_projections, linear
from bebop_spec.models.mtp_io import resolve_draft_vocab
from bebop_spec.spec import (
    SamplingTensors,
    TokenHistory,
    draft_tokens,
    draw_uniforms,
    entropy,
    expand_draft_logits,
    expand_draft_probs,
    process_logits,
    sample_from_probs,
    token_counts,
    verify_chain,
)

log = logging.getLogger("bebop.engine")
# Under the auto policy a row's unseen-by-the-head hiddens are fed to the head once more than
# this many accumulate during plain steps: bounded memory (≤ 512 × hidden values a row, 0.6 MB
# on SmolLM2 in bf16) and a bounded catch-up. Large, so that a policy that has stopped drafting
# rarely pays for the head (at 32 the catch-ups cost the demo model 5-7 % of its plain speed),
# and a row that finishes without drafting again never does.
MAX_PENDING = 512


@dataclass
class StepResult:
    """New tokens of one sequence from one step, with what the metrics need."""

    seq: Sequence
    tokens: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    entropies: list[float]
    top_logprobs: list[dict[int, float]] | None = None
    token_ids_logprobs: list[dict[int, float]] | None = None  # SamplingParams.logprob_token_ids
    num_accepted: int | None = None  # None: no drafts this step
    num_drafted: int = 0  # γ of this step
    verified_entropies: list[float] = field(default_factory=list)
    verified_accepted: list[bool] = field(default_factory=list)


def kv_blocks(config: EngineConfig, layers: int, kv_width: int, dtype: torch.dtype,
              cache_len: int) -> int:  # fmt: skip
    """KV blocks the memory budget holds (target and head layers together), capped at what
    max_num_seqs sequences of cache_len positions can use; ValueError if fewer than one."""
    per_block = PagedKVCache.bytes_per_block(layers, config.block_size, kv_width, dtype)
    budget = kv_budget_bytes(config.kv_cache_memory_gb, config.device)
    useful = config.max_num_seqs * -(-cache_len // config.block_size)
    blocks = config.num_kv_blocks or min(useful, budget // per_block)
    if blocks < 2:
        raise ValueError(
            f"the KV budget ({budget / 2**20:.1f} MiB) holds {blocks} blocks of "
            f"{config.block_size} positions ({per_block / 2**20:.2f} MiB each); at least 2 are "
            "needed: raise kv_cache_memory_gb"
        )
    return int(blocks)


def prefill_groups(seqs: list[Sequence], waste: float = 0.5) -> list[list[Sequence]]:
    """Level by level, rows sorted by tokens to feed (longest first) and cut where a row
    would be padded to more than 1 / (1 - waste) of its length."""
    groups: list[list[Sequence]] = []
    for level in sorted({s.prefill_level for s in seqs}):
        rows = sorted((s for s in seqs if s.prefill_level == level),
                      key=lambda s: s.num_cached - s.num_prefill_tokens)  # fmt: skip
        for s in rows:
            n = s.num_prefill_tokens - s.num_cached
            head = groups[-1][0] if groups and groups[-1][0].prefill_level == level else None
            if head is not None and n >= (1 - waste) * (head.num_prefill_tokens - head.num_cached):
                groups[-1].append(s)
            else:
                groups.append([s])
    return groups


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_model_len: int) -> None:
        self.config = config
        self.target = fuse_projections(loaded.target.eval())
        self.mtp = fuse_projections(loaded.mtp.eval()) if loaded.mtp is not None else None
        self.device = torch.device(config.device)
        self.gamma = config.gamma
        self.mode = config.draft_mode
        if self.mode is not None and self.mtp is None:
            raise ValueError("draft_mode needs an MTP head: pass mtp=DIR or use draft_mode=None")
        mc = loaded.config
        dtype = next(self.target.parameters()).dtype
        layers = mc.num_hidden_layers
        mtp_layers = self.mtp.num_layers if self.mtp is not None and self.mode else 0
        bs, lookahead = config.block_size, self.gamma + 1  # a step writes ≤ γ+1 positions
        self.num_blocks = kv_blocks(config, layers + mtp_layers,
                                    mc.num_key_value_heads * mc.head_dim, dtype,
                                    max_model_len + lookahead)  # fmt: skip
        # One sequence alone must always fit, or preemption could not guarantee progress.
        fits = self.num_blocks * bs - lookahead
        if fits < max_model_len:
            log.warning("KV budget holds %d blocks (%d positions): max_model_len %d -> %d",
                        self.num_blocks, self.num_blocks * bs, max_model_len, fits)  # fmt: skip
            max_model_len = fits
        self.max_model_len = max_model_len
        cache_len = max_model_len + lookahead
        shape = (self.num_blocks, bs, mc.num_key_value_heads, mc.head_dim, cache_len, dtype,
                 self.device)  # fmt: skip
        self.cache = PagedKVCache(layers, *shape)
        self.mtp_cache = PagedKVCache(mtp_layers, *shape) if mtp_layers else None
        self.eos_ids = list(mc.eos_token_ids)
        self.draft_ids = self._draft_vocab(config, mc.vocab_size)  # [K] or None: all V
        self._draft_weight: torch.Tensor | None = None  # lm_head rows of draft_ids, cached
        self._sampling_key: tuple[int, ...] = ()
        self._sampling_cached: SamplingTensors | None = None
        self._prompt_mask_key: tuple[int, ...] = ()
        self._prompt_mask: torch.Tensor | None = None

    @property
    def speculative(self) -> bool:
        return self.mtp_cache is not None

    def _draft_vocab(self, config: EngineConfig, vocab: int) -> torch.Tensor | None:
        if not self.speculative:
            return None
        ids = resolve_draft_vocab(config.mtp or config.model, config.draft_vocab_size, vocab)
        return None if ids is None else torch.tensor(sorted(ids), device=self.device)

    def draft_logits(self, g: torch.Tensor) -> torch.Tensor:
        """Draft logits[B, V] of head outputs g[B, H]: over draft_ids only, −∞ elsewhere
        (spec/draft_vocab.py), when a draft vocabulary is set."""
        if self.draft_ids is None:
            return self.target.compute_logits(g)
        return expand_draft_logits(self._draft_sub_logits(g), self.draft_ids, self.vocab_size)

    def _draft_sub_logits(self, g: torch.Tensor) -> torch.Tensor:
        """logits[B, K] of the draft vocabulary's tokens (its LM-head rows are cached)."""
        if self._draft_weight is None:
            self._draft_weight = self.target.lm_head_weight.index_select(0, self.draft_ids)
        return linear(g, self._draft_weight).float()

    def _draft_step(self, g: torch.Tensor, st: SamplingTensors, hist: TokenHistory | None,
                    u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One draft from head outputs g[B, H] → (ids[B], processed q[B, V]). With a draft
        vocabulary and no penalties (which read token ids over V) q is processed and sampled
        over the K draft tokens, then scattered to V: the same q (softmax, top-k / top-p /
        min-p see only the K finite logits either way) and the same inverse-CDF pick (the K
        tokens keep their id order), without the passes over V − K zeros."""
        if self.draft_ids is None or hist is not None:
            q = process_logits(self.draft_logits(g), st, hist)
            return draft_tokens(q, u, self.mode), q
        q_sub = process_logits(self._draft_sub_logits(g), st)
        ids = self.draft_ids[draft_tokens(q_sub, u, self.mode)]
        return ids, expand_draft_probs(q_sub, self.draft_ids, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.target.lm_head_weight.shape[0]

    def weights_changed(self) -> None:
        """Forget what was derived from the weights (the draft vocabulary's LM-head rows)."""
        self._draft_weight = None

    def _caches(self) -> list[PagedKVCache]:
        return [c for c in (self.cache, self.mtp_cache) if c is not None]

    @property
    def kv_released(self) -> bool:
        return self.cache.released

    def release_kv(self) -> int:
        """Free the KV pools (every sequence must have been retracted); returns bytes freed."""
        freed = sum(c.nbytes for c in self._caches())
        for c in self._caches():
            c.release()
        return freed

    def restore_kv(self) -> None:
        for c in self._caches():
            c.restore()

    # ------------------------------------------------------------------ helpers
    def _tensor(self, rows: list[list[int]], pad: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.device)

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """Block tables[B, max blocks], short rows padded with block 0 (never attended)."""
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                            dtype=torch.long, device=self.device)  # fmt: skip

    def _sampling(self, seqs: list[Sequence]) -> SamplingTensors:
        """The batch's sampling tensors, rebuilt only when the batch's membership changes."""
        key = tuple(s.seq_id for s in seqs)
        if key != self._sampling_key:
            params = [s.params for s in seqs]
            self._sampling_cached = SamplingTensors.from_params(params, self.device, self.eos_ids)
            self._sampling_key = key
        return self._sampling_cached

    def _history(self, seqs: list[Sequence], st: SamplingTensors) -> TokenHistory | None:
        """What the penalties read at each row's next position; None (no work) when no row of
        the batch uses them. The prompt mask is rebuilt only when the membership changes."""
        if st.penalties is None:
            return None
        vocab = self.target.lm_head_weight.shape[0]
        hist = TokenHistory.from_ids(None, [s.token_ids for s in seqs], vocab, self.device)
        if st.penalties.any_repetition:
            key = tuple(s.seq_id for s in seqs)
            if key != self._prompt_mask_key:
                prompts = [s.prompt_ids for s in seqs]
                self._prompt_mask = token_counts(prompts, vocab, self.device) > 0
                self._prompt_mask_key = key
            hist.prompt_mask = self._prompt_mask
        return hist

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[StepResult]:
        """Feed prompts (or everything but the last token after a retract) from the end of
        each row's shared prefix (`num_cached`, set by the block manager); sample token 1.

        Rows run in forwards grouped by `prefill_level` (a row reading blocks another row of
        the batch fills runs after it) and, within a level, by length: a sample that shares
        its prompt feeds a few tokens, and padding it to the full prompt would undo sharing."""
        results: list[StepResult] = []
        for group in prefill_groups(seqs):
            results += self._prefill_group(group)
        return results

    def _prefill_group(self, seqs: list[Sequence]) -> list[StepResult]:
        rows = [s.all_ids[s.num_cached : s.num_prefill_tokens] for s in seqs]
        lens = torch.tensor([len(r) for r in rows], device=self.device)
        start = torch.tensor([s.num_cached for s in seqs], device=self.device)
        ids = self._tensor(rows, pad=0)
        pos = self._positions(lens, ids.shape[1], start)
        hidden = self.target(ids, pos, self.cache, self._tables(seqs))  # [B, L, H]
        last = hidden[torch.arange(len(seqs), device=self.device), lens - 1]  # [B, H]
        for b, s in enumerate(seqs):
            if s.wants_prompt_logprobs:
                s.prompt_logprobs = self._score_prompt(s, hidden[b], s.num_cached)
            s.num_cached = s.num_prefill_tokens
        # max_tokens == 0 only scores the prompt (the engine finishes it after this step)
        sampled = [s for s in seqs if s.needs_sample_at_prefill and s.params.max_tokens > 0]
        results: list[StepResult] = []
        if sampled:
            idx = torch.tensor([i for i, s in enumerate(seqs) if s in sampled])
            results = self._sample_one(
                sampled, self.target.compute_logits(last[idx.to(self.device)])
            )
        if self.speculative:
            self._prefill_mtp(seqs, hidden, lens, start)
        return results

    def _score_prompt(self, s: Sequence, hidden: torch.Tensor, fed_from: int):
        """Score prompt tokens start+1..P-1 (start: the first causal row) from this prefill's
        hidden[L, H], whose row t is position fed_from + t (fed_from <= start: see
        Sequence.max_prefix_hit)."""
        lo, end = s.params.prompt_logprob_start + 1, s.num_prompt_tokens
        rows = hidden[lo - 1 - fed_from : max(lo - 1, end - 1) - fed_from]
        targets = torch.tensor(s.prompt_ids[lo:end], dtype=torch.long, device=self.device)
        return score_prompt(rows, targets, self.target.compute_logits, lo,
                            s.params.prompt_logprobs or 0, s.params.logprob_token_ids)  # fmt: skip

    def _positions(
        self, lens: torch.Tensor, width: int, start: torch.Tensor | None
    ) -> torch.Tensor:
        """positions[b, t] = start[b] + t for t < lens[b], else the cache's scratch column."""
        ar = torch.arange(width, device=self.device)[None, :]
        base = ar if start is None else start[:, None] + ar
        return torch.where(ar < lens[:, None], base, self.cache.scratch)

    def _prefill_mtp(self, seqs: list[Sequence], hidden: torch.Tensor, lens: torch.Tensor,
                     start: torch.Tensor) -> None:  # fmt: skip
        """Feed the head pairs (h_j, x_{j+1}) for start ≤ j < L-1 (the shared prefix's pairs
        are cached); keep h_{L-1} pending."""
        next_rows = [s.all_ids[s0 + 1 : s.num_cached]
                     for s, s0 in zip(seqs, start.tolist(), strict=True)]  # fmt: skip
        if max(len(r) for r in next_rows) > 0:
            nxt = self._tensor([r or [0] for r in next_rows], pad=0)
            pos = self._positions(lens - 1, nxt.shape[1], start)
            self.mtp(hidden[:, : nxt.shape[1]], nxt, pos, self.mtp_cache, self._tables(seqs),
                     embed=self.target.embed, step=0)  # fmt: skip
        for b, (s, n) in enumerate(zip(seqs, lens.tolist(), strict=True)):
            s.mtp_cached = s.num_cached - 1
            s.pending_hidden = hidden[b, n - 1 : n].clone()

    # ------------------------------------------------------------------ plain decode
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], gamma: int | None = None) -> list[StepResult]:
        """One decode step drafting `gamma` tokens per row (None: the configured γ; 0: plain)."""
        gamma = self.gamma if gamma is None else gamma
        if self.speculative and gamma > 0:
            return self._spec_decode(seqs, gamma)
        hidden = self._plain_forward(seqs)
        if self.speculative:  # the head sees these hiddens at the next drafting step
            for b, s in enumerate(seqs):
                s.pending_hidden = torch.cat([s.pending_hidden, hidden[b]])
            self._catch_up_mtp([s for s in seqs if len(s.pending_hidden) > MAX_PENDING])
        return self._sample_one(seqs, self.target.compute_logits(hidden[:, 0]))

    def _plain_forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each row's last token at its next position → hidden[B, 1, H]."""
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        pos = torch.tensor([[s.num_cached] for s in seqs], device=self.device)
        hidden = self.target(ids, pos, self.cache, self._tables(seqs))
        for s in seqs:
            s.num_cached += 1
        return hidden

    def _catch_up_mtp(self, seqs: list[Sequence]) -> None:
        """Feed the head every pending pair but the last (kept to start the next draft), so
        that a run of plain steps under the auto policy leaves bounded pending state."""
        if not seqs:
            return
        pend = [s.pending_hidden[:-1] for s in seqs]
        n_pairs = torch.tensor([h.shape[0] for h in pend], device=self.device)
        width = int(n_pairs.max())
        hid = torch.zeros(len(seqs), width, pend[0].shape[-1], dtype=pend[0].dtype,
                          device=self.device)  # fmt: skip
        for b, h in enumerate(pend):
            hid[b, : h.shape[0]] = h
        nxt = self._tensor([s.all_ids[s.mtp_cached + 1 : s.num_cached] for s in seqs], pad=0)
        start = torch.tensor([s.mtp_cached for s in seqs], device=self.device)
        pos = self._positions(n_pairs, width, start)
        self.mtp(hid, nxt, pos, self.mtp_cache, self._tables(seqs), embed=self.target.embed,
                 step=0)  # fmt: skip
        for s in seqs:
            s.mtp_cached = s.num_cached - 1
            s.pending_hidden = s.pending_hidden[-1:].clone()

    def _sample_one(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepResult]:
        """Sample one token per row from processed logits[B, V]."""
        st = self._sampling(seqs)
        probs = process_logits(logits, st, self._history(seqs, st))
        u = draw_uniforms([s.generator for s in seqs], 1)[:, 0].to(self.device)
        tok = sample_from_probs(probs, u)
        return self._records(seqs, logits[:, None], probs[:, None], tok[:, None],
                             torch.ones(len(seqs), dtype=torch.long))  # fmt: skip

    # ------------------------------------------------------------------ speculative decode
    def _spec_decode(self, seqs: list[Sequence], gamma: int) -> list[StepResult]:
        dev = self.device
        st = self._sampling(seqs)
        u = draw_uniforms([s.generator for s in seqs], 2 * gamma + 1).to(dev)
        tables = self._tables(seqs)
        hist = self._history(seqs, st)  # position k of the chain also saw drafts[:, :k]
        drafts, q = self._draft(seqs, st, hist, u[:, :gamma], tables)  # [B, γ], [B, γ, V]

        start = torch.tensor([s.num_cached for s in seqs], device=dev)
        ids = torch.cat([torch.tensor([[s.last_token] for s in seqs], device=dev), drafts], 1)
        pos = start[:, None] + torch.arange(gamma + 1, device=dev)[None, :]
        hidden = self.target(ids, pos, self.cache, tables)  # [B, γ+1, H]
        logits = self.target.compute_logits(hidden)  # [B, γ+1, V]
        p = process_logits(logits, st, None if hist is None else hist.along(drafts))
        num_acc, tokens = verify_chain(
            drafts, q, p, u[:, gamma : 2 * gamma], u[:, 2 * gamma], self.mode
        )

        n_new = num_acc + 1
        results = self._records(seqs, logits, p, tokens, n_new)
        for b, (s, r) in enumerate(zip(seqs, results, strict=True)):
            a = int(num_acc[b])
            r.num_accepted = a
            r.num_drafted = gamma
            n_verified = min(a + 1, gamma)  # r.entropies covers positions 0..a of p
            r.verified_entropies = r.entropies[:n_verified]
            r.verified_accepted = [True] * a + [False] * (n_verified - a)
            s.mtp_cached = s.num_cached
            s.num_cached += a + 1
            s.pending_hidden = hidden[b, : a + 1].clone()
        return results

    def _draft(self, seqs: list[Sequence], st: SamplingTensors, hist: TokenHistory | None,
               u: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """γ chained MTP steps → drafts[B, γ] and processed q[B, γ, V]; step k's q reads `hist`
        advanced by the drafts before it."""
        dev = self.device
        pend = [s.pending_hidden for s in seqs]
        n_pairs = torch.tensor([h.shape[0] for h in pend], device=dev)
        width = int(n_pairs.max())
        hid = torch.zeros(len(seqs), width, pend[0].shape[-1], dtype=pend[0].dtype, device=dev)
        for b, h in enumerate(pend):
            hid[b, : h.shape[0]] = h
        nxt = self._tensor([s.all_ids[s.mtp_cached + 1 : s.num_cached + 1] for s in seqs], pad=0)
        start = torch.tensor([s.mtp_cached for s in seqs], device=dev)
        pos = self._positions(n_pairs, width, start)
        g = self.mtp(hid, nxt, pos, self.mtp_cache, tables, embed=self.target.embed, step=0)
        g = g[torch.arange(len(seqs), device=dev), n_pairs - 1]  # [B, H]
        last_pos = start + n_pairs - 1  # position of the last real pair
        drafts, qs = [], []
        for k in range(u.shape[1]):
            if k > 0:
                pos_k = (last_pos + k)[:, None]
                g = self.mtp(g[:, None], drafts[-1][:, None], pos_k, self.mtp_cache, tables,
                             embed=self.target.embed, step=k)[:, 0]  # fmt: skip
            d_k, q_k = self._draft_step(g, st, hist, u[:, k])
            drafts.append(d_k)
            qs.append(q_k)
            if hist is not None:
                hist = hist.advance(drafts[-1])
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    # ------------------------------------------------------------------ records
    def _records(self, seqs: list[Sequence], logits: torch.Tensor, probs: torch.Tensor,
                 tokens: torch.Tensor, n_new: torch.Tensor) -> list[StepResult]:  # fmt: skip
        """Per-row logprobs / entropies of tokens[B, T] (first n_new[b] valid) under probs[B, T, V]."""
        safe = tokens.clamp_min(0)[..., None]
        lp = torch.log(probs.gather(-1, safe).squeeze(-1)).tolist()
        logits = logits.float()  # log_softmax gathered: one pass over V, no [B, T, V] written
        raw = (logits.gather(-1, safe).squeeze(-1) - logits.logsumexp(-1)).tolist()
        ent = _entropies(probs, n_new)
        tok = tokens.tolist()
        want_top = max((s.params.logprobs or 0) for s in seqs)
        top_v = top_i = None
        if want_top:
            top_v, top_i = torch.log(probs).topk(min(want_top, probs.shape[-1]), -1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        out = []
        for b, s in enumerate(seqs):
            n = int(n_new[b])
            k = s.params.logprobs or 0
            tops = chosen = None
            if k:
                tops = [dict(zip(top_i[b][t][:k], top_v[b][t][:k], strict=True)) for t in range(n)]
            if s.params.logprob_token_ids:
                ids = s.params.logprob_token_ids
                rows = torch.log(probs[b, :n][:, torch.tensor(ids, device=probs.device)])
                chosen = [dict(zip(ids, r, strict=True)) for r in rows.tolist()]
            out.append(StepResult(s, tok[b][:n], lp[b][:n], raw[b][:n], ent[b], tops, chosen))
        return out

    # ------------------------------------------------------------------ weights
    def parameters_by_selector(self, selector: str) -> dict[str, torch.nn.Parameter]:
        params: dict[str, torch.nn.Parameter] = {}
        if selector in ("target", "all"):
            params.update(dict(self.target.named_parameters()))
        if selector in ("draft", "all"):
            if self.mtp is None:
                if selector == "draft":
                    raise WeightUpdateError("selector 'draft' but the engine has no MTP head")
            else:
                params.update(dict(self.mtp.named_parameters()))
        if selector not in ("target", "draft", "all"):
            raise WeightUpdateError(f"selector={selector!r} must be target, draft or all")
        return params

    def aliases(self, selector: str) -> dict[str, str]:
        """Names a trainer may send that are stored under another name here (tied embeddings)."""
        return tied_aliases(dict(self.target.named_parameters()), selector)


def _entropies(probs: torch.Tensor, n_new: torch.Tensor) -> list[list[float]]:
    """Entropy of probs[b, t] for t < n_new[b], per row: only the positions a step emits
    (entr over V is the costliest elementwise pass of a step; a drafting step of γ = 3 at
    E[A] ≈ 0.75 emits 1.75 of its 4 positions)."""
    counts = n_new.tolist()
    if all(n == probs.shape[1] for n in counts):
        return entropy(probs).tolist()
    keep = torch.arange(probs.shape[1], device=probs.device)[None, :] < n_new[:, None]
    flat = entropy(probs[keep]).tolist()
    out, i = [], 0
    for n in counts:
        out.append(flat[i : i + n])
        i += n
    return out
