"""Self-distillation data sampled from running servers: `bebop mtp data --server URL ...`.

    cfg = RemoteDataConfig(DataConfig(model="path/to/target", out="data/train", num_prompts=256),
                           servers=("http://h1:8000", "http://h2:8000"), api="openai")
    meta = generate_remote_dataset(cfg)  # -> data/train/{data.safetensors,meta.json,samples.jsonl}

The same dataset as the embedded path (selfdistill.py): the same prompts, encoded by the
target's tokenizer, the same per-prompt seeds, prompt + response with the loss on the
response (its final EOS included), the same meta.json plus `servers` and `server_api`.
Before sampling, every server must tokenize a few probe strings as the local tokenizer does
(`/tokenize` or `/v1/tokenize`). Finished samples are appended to OUT/samples.jsonl as they
arrive (sample_shard.py), so a killed run, rerun with the same settings, asks only for what
is missing; the dataset is written once every sample is there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bebop_spec.train.data import DatasetMeta, write_dataset
from bebop_spec.train.remote_client import (
    SERVER_APIS,
    RemoteError,
    RetryPolicy,
    SampleRequest,
    ServerApi,
    ServerPool,
)
from bebop_spec.train.sample_shard import Record, SampleShard
from bebop_spec.train.selfdistill import (
    DataConfig,
    distill_sample,
    encode_prompts,
    load_prompts,
    prompt_seed,
    provenance,
)

SHARD_FILE = "samples.jsonl"
# Strings the server's tokenizer must split exactly as the target's: words, code, whitespace,
# non-ASCII text, digits (the target's EOS token is added to them).
PROBES = (
    "Hello, world! The answer is 42.",
    "def f(x):\n    return x ** 2  # squared\n",
    "  two leading spaces,\ttabs and\n\nblank lines ",
    "Ünïcödé: naïve café, 数学, Привет 🙂",
    "3.14159 + 2718 = 12345678901",
)


@dataclass
class RemoteDataConfig:
    data: DataConfig  # prompts, sampling and output, as for the embedded path
    servers: tuple[str, ...]  # base URLs, e.g. http://host:8000
    api: str = "openai"  # openai (/v1/completions) | sglang (/generate)
    concurrency: int = 16  # requests in flight over all servers
    max_retries: int = 5  # per request, after connection errors / 429 / 5xx / aborts
    backoff_s: float = 0.5  # first retry wait, doubled each time
    timeout_s: float = 600.0  # per request
    api_key: str | None = None  # bearer key (servers started with --api-key)
    skip_tokenizer_check: bool = False

    def __post_init__(self) -> None:
        self.servers = tuple(s.rstrip("/") for s in self.servers)
        checks = [
            ("servers", bool(self.servers), "must name at least one URL"),
            ("servers", all(s.startswith(("http://", "https://")) for s in self.servers),
             "must be http:// or https:// URLs"),
            ("servers", len(set(self.servers)) == len(self.servers), "has duplicates"),
            ("api", self.api in SERVER_APIS, f"must be one of {sorted(SERVER_APIS)}"),
            ("concurrency", self.concurrency >= 1, "must be >= 1"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
        ]  # fmt: skip
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"RemoteDataConfig.{name}={getattr(self, name)!r} {why}")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.backoff_s)

    @property
    def shard_path(self) -> Path:
        return Path(self.data.out) / SHARD_FILE


@dataclass(frozen=True)
class ServerInfo:
    model: str | None  # the served model name (/v1/models), sent with OpenAI requests
    max_model_len: int | None


def generate_remote_dataset(cfg: RemoteDataConfig, progress: bool = True,
                            transport: Any = None) -> DatasetMeta:  # fmt: skip
    """Sample cfg's prompts on cfg.servers and write the dataset to cfg.data.out (resuming
    from its samples.jsonl); returns its meta. `transport`: an httpx transport (tests)."""
    from bebop_spec.models import load_tokenizer

    prompts = load_prompts(cfg.data)
    source = cfg.data.tokenizer or cfg.data.model
    if not Path(source).is_dir():
        raise ValueError(f"{source} is not a directory: --model (or --tokenizer) must be the "
                         "target's local directory, for its tokenizer")  # fmt: skip
    tokenizer = load_tokenizer(source)
    return asyncio.run(_generate(cfg, prompts, tokenizer, progress, transport))


async def _generate(cfg: RemoteDataConfig, prompts: list, tokenizer: Any, progress: bool,
                    transport: Any) -> DatasetMeta:  # fmt: skip
    api = SERVER_APIS[cfg.api]()
    async with ServerPool(cfg.servers, cfg.retry, cfg.concurrency, cfg.timeout_s, cfg.api_key,
                          transport) as pool:  # fmt: skip
        infos = dict(zip(pool.urls, await asyncio.gather(*(describe(pool, u) for u in pool.urls)),
                         strict=True))  # fmt: skip
        if not cfg.skip_tokenizer_check:
            where = cfg.data.tokenizer or cfg.data.model
            await asyncio.gather(*(check_tokenizer(pool, u, tokenizer, where) for u in pool.urls))
        limits = [i.max_model_len for i in infos.values() if i.max_model_len]
        limits += [cfg.data.max_model_len] if cfg.data.max_model_len else []
        limit = min(limits) if limits else None
        kept, encoded, skipped = encode_prompts(prompts, tokenizer, limit)
        with SampleShard(cfg.shard_path, _header(cfg, kept, encoded)) as shard:
            await _sample_missing(pool, api, cfg, infos, encoded, limit, shard, progress)
            done = shard.done
    n = cfg.data.samples_per_prompt
    records = [done[i, j] for i in range(len(kept)) for j in range(n)]
    samples = (distill_sample(encoded[r.prompt], r.token_ids, kept[r.prompt].domain)
               for r in records)  # fmt: skip
    extra = provenance(cfg.data, skipped, [r.finish_reason for r in records])
    extra |= {"server_api": cfg.api, "servers": sorted({r.server for r in records})}
    return write_dataset(cfg.data.out, samples, model=str(cfg.data.model),
                         temperature=cfg.data.temperature, extra=extra)  # fmt: skip


async def describe(pool: ServerPool, url: str) -> ServerInfo:
    """The served model's name and context length from /v1/models (None where not given)."""
    try:
        _, reply = await pool.request("GET", "/v1/models", url=url)
    except RemoteError as e:
        if e.status != 404:
            raise
        return ServerInfo(None, None)
    card = (reply.get("data") or [{}])[0]
    length = card.get("max_model_len")
    return ServerInfo(card.get("id"), int(length) if length else None)


async def check_tokenizer(pool: ServerPool, url: str, tokenizer: Any, where: str) -> None:
    """ValueError unless the server at `url` tokenizes PROBES (and the EOS token) exactly as
    `tokenizer` does: prompts are encoded here and responses decoded with this tokenizer."""
    if tokenizer is None:
        raise ValueError(f"{where} has no tokenizer to compare with the server's; pass "
                         "--tokenizer DIR, or --skip-tokenizer-check")  # fmt: skip
    eos = getattr(tokenizer, "eos_token", None)
    for text in PROBES + ((eos,) if eos else ()):
        ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs = await _server_tokens(pool, url, text)
        if theirs != ours:
            raise ValueError(f"tokenizer mismatch: {url} tokenizes {text!r} as {theirs[:12]} but "
                             f"{where}'s tokenizer as {ours[:12]}; serve the target's tokenizer, "
                             "or pass --skip-tokenizer-check")  # fmt: skip


async def _server_tokens(pool: ServerPool, url: str, text: str) -> list[int]:
    body = {"prompt": text, "add_special_tokens": False}
    for path in ("/tokenize", "/v1/tokenize"):  # vLLM's and Bebop's; SGLang's
        try:
            _, reply = await pool.request("POST", path, body=lambda _: body, url=url)
            return [int(t) for t in reply["tokens"]]
        except RemoteError as e:
            if e.status != 404:
                raise
    raise ValueError(f"{url} offers neither /tokenize nor /v1/tokenize to check its tokenizer "
                     "against the target's; pass --skip-tokenizer-check to sample anyway")  # fmt: skip


def _header(cfg: RemoteDataConfig, kept: list, encoded: list[list[int]]) -> dict[str, Any]:
    """What the shard's samples depend on (the prompts as token ids, so also the tokenizer);
    the servers, and the path the target is found at, may change between runs."""
    d = cfg.data
    prompts = json.dumps([[p.domain, ids] for p, ids in zip(kept, encoded, strict=True)])
    return {"server_api": cfg.api, "temperature": d.temperature,
            "top_p": d.top_p, "max_tokens": d.max_tokens, "seed": d.seed,
            "samples_per_prompt": d.samples_per_prompt, "num_prompts": len(kept),
            "prompts_sha256": hashlib.sha256(prompts.encode()).hexdigest()}  # fmt: skip


async def _sample_missing(pool: ServerPool, api: ServerApi, cfg: RemoteDataConfig,
                          infos: dict[str, ServerInfo], encoded: list[list[int]],
                          limit: int | None, shard: SampleShard, progress: bool) -> None:  # fmt: skip
    """One request of n samples per prompt with any sample missing, `concurrency` in flight;
    each sample is recorded as it arrives. The first failure cancels the rest and is raised."""
    from tqdm.auto import tqdm

    d, n = cfg.data, cfg.data.samples_per_prompt
    todo = [i for i in range(len(encoded)) if any((i, j) not in shard.done for j in range(n))]
    bar = tqdm(total=len(encoded) * n, initial=len(shard.done), disable=not progress,
               desc="samples", unit="sample")  # fmt: skip
    gate = asyncio.Semaphore(cfg.concurrency)

    async def one(i: int) -> None:
        room = d.max_tokens if limit is None else min(d.max_tokens, limit - len(encoded[i]))
        req = SampleRequest(encoded[i], n, room, d.temperature, d.top_p, prompt_seed(d.seed, i))
        async with gate:
            url, completions = await pool.request(
                "POST", api.path, body=lambda u: api.body(req, infos[u].model),
                parse=lambda reply: api.parse(reply, n),
            )  # fmt: skip
        for j, c in enumerate(completions):
            if (i, j) not in shard.done:
                shard.add(Record(i, j, c.token_ids, c.finish_reason, url))
                bar.update(1)

    tasks = [asyncio.ensure_future(one(i)) for i in todo]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()


__all__ = ["PROBES", "SHARD_FILE", "RemoteDataConfig", "check_tokenizer",
           "generate_remote_dataset"]  # fmt: skip
