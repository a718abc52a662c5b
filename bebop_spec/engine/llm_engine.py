"""The synchronous engine core: requests in, `step()` out. `LLM` and `AsyncEngine` wrap it."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Mapping

import torch

from bebop_spec.engine.block_manager import BlockManager
from bebop_spec.engine.config import EngineConfig, SpecPolicy
from bebop_spec.engine.gamma import GammaController
from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats
from bebop_spec.engine.postprocess import append_step, refresh_text
from bebop_spec.engine.runner import ModelRunner, StepResult
from bebop_spec.engine.scheduler import Scheduler
from bebop_spec.engine.sequence import Sequence
from bebop_spec.engine.weights import apply_weight_update, tensor_digests
from bebop_spec.errors import InvalidRequest
from bebop_spec.hardware import checkpoint_dtype, resolve_dtype
from bebop_spec.models import LoadedModel, load_model
from bebop_spec.sampling_params import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.dtype = resolve_dtype(config.dtype, checkpoint_dtype(config.model), config.device)
        if loaded is None:
            loaded = load_model(config.model, mtp=config.mtp, dtype=_DTYPES[self.dtype],
                                device=config.device)  # fmt: skip
        if config.enforce_no_mtp:
            loaded.mtp = None
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        limit = self.model_config.max_position_embeddings
        self.runner = ModelRunner(loaded, config, min(config.max_model_len or limit, limit))
        self.max_model_len = self.runner.max_model_len  # lowered if the KV budget is small
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size,
                                   config.enable_prefix_caching)  # fmt: skip
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs,
                                   max(2048, self.max_model_len), config.max_waiting,
                                   lookahead=self.runner.gamma)  # fmt: skip
        self.eos_ids = set(self.model_config.eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: dict[str, list[int]] = {}
        self.version = 0
        self.version_labels: dict[int, str] = {0: "default"}
        self.spec_totals = SpecStats()
        self.gamma_policy = (
            GammaController(config.num_speculative_tokens)
            if self.runner.speculative and config.spec_policy == SpecPolicy.AUTO
            else None
        )
        self.observers: list[Callable[[StepStats], None]] = []
        self._rng = torch.Generator().manual_seed(config.seed)
        self._seq_ids = itertools.count()
        # request id -> error message of requests whose own step failed (drained by the caller)
        self.failed: dict[str, str] = {}

    # ------------------------------------------------------------------ requests
    @property
    def weight_version(self) -> str:
        return self.version_labels[self.version]

    def validate_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len} "
                "(at least one token must fit after it)"
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        self.validate_prompt(prompt_ids)
        if params.n > self.config.max_waiting:
            raise InvalidRequest(
                f"n={params.n} exceeds the waiting-queue bound {self.config.max_waiting}"
            )
        # The sampler packs these into float32 / int64 tensors for the whole batch: a value
        # that does not fit there would fail every running request's step, not just this one.
        if not torch.tensor(params.top_p, dtype=torch.float32) > 0:
            raise InvalidRequest(f"top_p={params.top_p} rounds to 0 in float32")
        if params.top_k >= 2**63:
            raise InvalidRequest(f"top_k={params.top_k} does not fit in int64")
        bias = params.logit_bias or {}
        if not torch.tensor(list(bias.values()), dtype=torch.float32).isfinite().all():
            raise InvalidRequest("logit_bias values overflow float32")
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", list(bias)), ("logprob_token_ids",
                                                       params.logprob_token_ids or [])):  # fmt: skip
            if any(t >= vocab for t in ids):
                raise InvalidRequest(f"{name} token id {max(ids)} outside the vocabulary")
        if params.scores_prompt and params.prompt_logprob_start >= len(prompt_ids):
            raise InvalidRequest(f"prompt_logprob_start={params.prompt_logprob_start} is not "
                                 f"below the prompt's {len(prompt_ids)} tokens")  # fmt: skip
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; use stop_token_ids")
        seqs = []
        for j in range(params.n):
            p = params.for_sample(j)
            seed = (
                p.seed
                if p.seed is not None
                else int(torch.randint(2**62, (1,), generator=self._rng))
            )
            seqs.append(Sequence(next(self._seq_ids), request_id, j, list(prompt_ids), p,
                                 torch.Generator().manual_seed(seed)))  # fmt: skip
        self.scheduler.add(seqs)
        self.requests[request_id] = seqs
        self.prompts[request_id] = list(prompt_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        seqs = self.requests.get(request_id)
        if seqs is None:
            return None
        for s in seqs:
            if not s.is_finished:
                s.finish("abort", "aborted")
            self.scheduler.release(s)
        return self._pop_output(request_id)

    def abort_all(self) -> list[RequestOutput]:
        return [o for rid in list(self.requests) if (o := self.abort(rid)) is not None]

    def retract_all(self) -> int:
        return len(self.scheduler.retract_all())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ------------------------------------------------------------------ step
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one prefill or decode step; return outputs of every request that progressed
        (or, with `only_finished`, of those that finished: offline use, no per-step copies)."""
        t0 = time.perf_counter()
        before = (self.scheduler.num_preemptions, self.blocks.stats.queried_tokens,
                  self.blocks.stats.hit_tokens)  # fmt: skip
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if self.runner.kv_released:  # released by release_kv: allocated again on first use
            self.runner.restore_kv()
        gamma = self._choose_gamma(batch)
        results = self._run_isolating(batch.kind, batch.seqs, gamma)
        stats = StepStats(draft_mode=self.config.draft_mode or "none",
                          gamma=gamma if batch.kind == "decode" else None)  # fmt: skip
        if batch.kind == "prefill":
            stats.num_prompt_tokens = sum(s.num_prompt_tokens for s in batch.seqs)
            if self.gamma_policy is not None:
                self.gamma_policy.observe_prefill()
        touched: dict[str, None] = {}
        for r in results:
            self._apply(r, stats)
        if self.gamma_policy is not None and gamma > 0:
            accepted = [r.num_accepted for r in results if r.num_accepted is not None]
            self.gamma_policy.observe_acceptance(accepted, gamma)
        for s in batch.seqs:
            touched[s.request_id] = None
            if batch.kind == "prefill" and s.params.max_tokens == 0 and not s.is_finished:
                s.finish("length")  # scored its prompt, generates nothing
            if s.is_finished:
                self.scheduler.release(s)
        stats.num_running = self.num_running
        stats.num_waiting = self.num_waiting
        stats.kv_blocks_used, stats.kv_blocks_total = self.blocks.num_used, self.blocks.num_blocks
        stats.num_preemptions = self.scheduler.num_preemptions - before[0]
        stats.prefix_queried_tokens = self.blocks.stats.queried_tokens - before[1]
        stats.prefix_hit_tokens = self.blocks.stats.hit_tokens - before[2]
        stats.step_seconds = time.perf_counter() - t0
        if self.gamma_policy is not None and batch.kind == "decode" and results:
            self.gamma_policy.observe_cost(len(batch.seqs), gamma, stats.step_seconds)
        for fn in self.observers:
            fn(stats)
        if only_finished:
            touched = {rid: None for rid in touched if rid in self.requests and self._done(rid)}
        return [self._output(rid) for rid in touched if rid in self.requests]

    def _choose_gamma(self, batch) -> int:
        """γ of this step: 0 for prefills and plain engines; the policy's choice under auto.

        Under auto a seeded request is exactly distributed but not bit-reproducible: the sample
        a seed produces depends on the draft lengths it was drawn under, which follow measured
        timings. SpecPolicy.FIXED (or no speculation) makes seeded samples reproducible."""
        if batch.kind != "decode" or not self.runner.speculative:
            return 0
        if self.gamma_policy is None:
            return self.runner.gamma
        return self.gamma_policy.choose(len(batch.seqs))

    def _done(self, request_id: str) -> bool:
        return all(s.is_finished for s in self.requests[request_id])

    def _run(self, kind: str, seqs: list[Sequence], gamma: int) -> list[StepResult]:
        return self.runner.prefill(seqs) if kind == "prefill" else self.runner.decode(seqs, gamma)

    def _run_isolating(self, kind: str, seqs: list[Sequence], gamma: int) -> list[StepResult]:
        """Run the batch; if it raises, rerun each sequence alone so that only the requests
        whose own step fails are aborted (their errors go to `failed`) and the rest go on.
        Safe to rerun: the runner mutates a sequence's cache bookkeeping only after its
        forward passes succeed, and a prefill recomputes from the token ids — in full, since
        the blocks a failed batch was filling may be shared and half written."""
        try:
            return self._run(kind, seqs, gamma)
        except Exception:
            if len(seqs) == 1 and len(self.requests[seqs[0].request_id]) == 1:
                return self._fail([(seqs[0], sys.exc_info()[1])])
        if kind == "prefill":
            self.blocks.invalidate()
            for seq in seqs:
                seq.num_cached = seq.mtp_cached = seq.prefill_level = 0
        results, failed = [], []
        for seq in seqs:
            try:
                results += self._run(kind, [seq], gamma)
            except Exception as exc:
                failed.append((seq, exc))
        return results + self._fail(failed)

    def _fail(self, failed: list[tuple[Sequence, BaseException | None]]) -> list[StepResult]:
        for seq, exc in failed:
            if seq.request_id in self.requests:
                self.failed[seq.request_id] = f"engine step failed: {type(exc).__name__}: {exc}"
                self.abort(seq.request_id)
        return []

    def _apply(self, r: StepResult, stats: StepStats) -> None:
        seq = r.seq
        kept = append_step(seq, r, self.version, self.eos_ids, self.max_model_len, self.tokenizer)
        stats.num_generated_tokens += kept
        if r.num_accepted is None:
            return
        gamma = r.num_drafted
        seq.spec.add(r.num_accepted, gamma)
        self.spec_totals.add(r.num_accepted, gamma)
        stats.num_drafts += 1
        stats.num_draft_tokens += gamma
        stats.num_accepted_tokens += r.num_accepted
        if len(stats.accepted_per_pos) < gamma:
            stats.accepted_per_pos = [0] * gamma
        for i in range(r.num_accepted):
            stats.accepted_per_pos[i] += 1
        stats.verified_entropies += r.verified_entropies
        stats.verified_accepted += r.verified_accepted

    def _output(self, request_id: str) -> RequestOutput:
        out = self._request_output(request_id, self.requests[request_id])
        if out.finished:
            self._pop_output(request_id)
        return out

    def _pop_output(self, request_id: str) -> RequestOutput:
        out = self._request_output(request_id, self.requests.pop(request_id))
        self.prompts.pop(request_id)
        return out

    def _request_output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        return RequestOutput(request_id, self.prompts[request_id], self._completions(seqs),
                             prompt_logprobs=seqs[0].prompt_logprobs)  # fmt: skip

    def _completions(self, seqs: list[Sequence]) -> list:
        for s in seqs:
            refresh_text(s, self.tokenizer)
        return [s.to_output() for s in seqs]

    # ------------------------------------------------------------------ weights
    def weight_spec(self, selector: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        params = self.runner.parameters_by_selector(selector)
        return {k: (tuple(v.shape), v.dtype) for k, v in params.items()}

    def update_weights(self, tensors: Mapping[str, torch.Tensor], selector: str = "target",
                       weight_version: str | None = None) -> str:  # fmt: skip
        """Validate everything, then copy in place; the version moves only on success."""
        params = self.runner.parameters_by_selector(selector)
        apply_weight_update(params, tensors, self.runner.aliases(selector))
        self.runner.weights_changed()
        self.blocks.invalidate()  # cached prefixes hold K/V of the old weights
        self.version += 1
        self.version_labels[self.version] = weight_version or str(self.version)
        return self.weight_version

    def weight_checksums(self, selector: str = "target") -> dict[str, str]:
        """SHA-256 of each served tensor, keyed as vLLM's only worker keys them."""
        return tensor_digests(self.runner.parameters_by_selector(selector), "dp0:pp0:pcp0:tp0:")

    def weight_aliases(self, selector: str) -> dict[str, str]:
        """Update names stored under another name here (tied embeddings: lm_head → embed)."""
        return self.runner.aliases(selector)

    def relabel_weight_version(self, label: str) -> str:
        """Rename the serving weights' version without changing them (SGLang's
        /update_weight_version); the counter stays, so per-token records are unchanged."""
        if not label:
            raise InvalidRequest("weight_version label must be non-empty")
        self.version_labels[self.version] = label
        return label

    def release_kv(self) -> int:
        """Free the KV pool's memory (weights stay): running sequences are retracted and
        recomputed when generation resumes, which allocates the pool again. Returns bytes freed."""
        self.retract_all()
        self.blocks.invalidate()
        return self.runner.release_kv()

    def flush_cache(self) -> int:
        """Drop all cached K/V: running sequences are re-prefilled under the current weights,
        and no cached prefix serves a later request."""
        n = self.retract_all()
        self.blocks.invalidate()
        return n
