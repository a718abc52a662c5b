"""The RL loop of the GRPO example (`grpo.py` is its command line).

    records = asyncio.run(run(cfg, "http://127.0.0.1:30000"))

Per step: rollouts -> rewards, advantages, staleness weights -> PPO-clipped update (and the
online head update) -> weight push; in async mode the next rollouts are in flight meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bebop_client import AsyncRolloutClient
from grpo_config import GRPOConfig
from grpo_report import append_jsonl, plot_run, spec_window
from grpo_sync import Pusher
from grpo_task import Problem, step_problems, task_reward
from grpo_trainer import (
    StepConfig,
    TrainSample,
    group_advantages,
    grpo_step,
    head_step,
    load_policy,
    stale_weights,
    staleness,
)


@dataclass
class Rollout:
    step: int
    temperature: float
    problems: list[Problem]
    groups: list  # [prompt][sample] bebop_client.Sample
    seconds: float
    window: dict  # spec_window of the /metrics delta over this rollout


async def rollout(client: AsyncRolloutClient, cfg: GRPOConfig, tok, step: int,
                  run_id: str) -> Rollout:  # fmt: skip
    problems = step_problems(tok, cfg.seed, step, cfg.prompts_per_step, cfg.max_ops, cfg.level)
    temp = cfg.temperature_at(step)
    params = {"temperature": temp, "max_new_tokens": cfg.max_tokens}
    before = await client.metrics()
    t0 = time.perf_counter()
    groups = await asyncio.gather(*(
        client.generate(p.prompt_ids, {**params, "sampling_seed": cfg.sample_seed(step, i)},
                        n=cfg.group_size, rid=f"{run_id}-s{step}-p{i}")
        for i, p in enumerate(problems)
    ))  # fmt: skip
    seconds = time.perf_counter() - t0
    window = (await client.metrics()).delta(before)
    return Rollout(step, temp, problems, list(groups), seconds, spec_window(window))


def build_samples(ro: Rollout, policy_version: int, cfg: GRPOConfig) -> tuple[list, dict]:
    """Rewards, advantages and staleness weights -> (TrainSamples, rollout stats)."""
    rewards_all, samples, dropped, max_lag, versions = [], [], Counter(), 0, Counter()
    for prob, group in zip(ro.problems, ro.groups, strict=True):
        rewards = [task_reward(s.text, prob.answer) for s in group]
        rewards_all += rewards
        for s, adv in zip(group, group_advantages(rewards), strict=True):
            tokens_v = s.weight_versions or [str(policy_version)] * s.num_tokens
            versions.update(tokens_v)
            lags = staleness(tokens_v, policy_version)
            max_lag = max(max_lag, max(lags, default=0))
            weights = stale_weights(lags, cfg.max_staleness, cfg.stale_decay)
            if weights is None:
                dropped["stale"] += 1
                continue
            if s.aborted or not s.token_ids or len(s.logprobs) != s.num_tokens:
                dropped["unusable"] += 1  # aborted, empty, or no logprobs
                continue
            samples.append(TrainSample(s.prompt_ids, s.token_ids, s.logprobs, adv, weights, lags))
    flat = [s for g in ro.groups for s in g]
    n = max(len(flat), 1)
    stats = {
        "reward": sum(rewards_all) / n,
        "groups_with_signal": sum(len({task_reward(s.text, p.answer) for s in g}) > 1
                                  for p, g in zip(ro.problems, ro.groups, strict=True)),
        "samples": len(flat), "completion_tokens": sum(s.num_tokens for s in flat),
        "truncated": sum(s.truncated for s in flat) / n,
        "dropped_stale": dropped["stale"], "dropped_unusable": dropped["unusable"],
        "max_staleness": max_lag,
        "mixed_version_samples": sum(s.mixed_versions for s in flat),
        "token_versions": dict(versions),
    }  # fmt: skip
    return samples, stats


def train_and_push(ro: Rollout, policy, opt, head, head_opt, pusher: Pusher, cfg: GRPOConfig,
                   policy_version: int) -> dict:  # fmt: skip
    """Runs on a worker thread while the event loop keeps the next rollouts going."""
    samples, rec = build_samples(ro, policy_version, cfg)
    t0 = time.perf_counter()
    if samples:
        step_cfg = StepConfig(ro.temperature, cfg.clip, cfg.entropy_coef, cfg.micro_batch)
        rec |= grpo_step(policy, opt, samples, step_cfg)
    t1 = time.perf_counter()
    if head is not None and samples:
        rec |= head_step(policy, head, head_opt, samples, cfg.online_head, cfg.gamma,
                         seed=cfg.seed + ro.step)  # fmt: skip
    t2 = time.perf_counter()
    rec["weight_version"] = pusher.push(policy, head, policy_version + 1)
    t3 = time.perf_counter()
    return rec | {"train_s": t1 - t0, "head_s": t2 - t1, "push_s": t3 - t2}


def log_line(rec: dict) -> str:
    acc = "-" if rec.get("acceptance") is None else f"{rec['acceptance']:.3f}"
    ent = rec.get("policy_entropy")
    return (f"step {rec['step']:3d}  reward {rec['reward']:.3f}  entropy "
            f"{'-' if ent is None else f'{ent:.3f}'}  acceptance {acc}  rollout "
            f"{rec['rollout_s']:.1f}s  step {rec['step_s']:.1f}s  stale {rec['max_staleness']}"
            f"/{rec['dropped_stale']} dropped  -> weights {rec['weight_version']}")  # fmt: skip


async def run(cfg: GRPOConfig, url: str) -> list[dict]:
    """The RL loop against the server at `url`; returns the per-step records."""
    policy, head, tok = load_policy(cfg.model, cfg.mtp if cfg.online_head else None)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    head_opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr) if head is not None else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_path = out / "steps.jsonl"
    steps_path.unlink(missing_ok=True)
    run_id, records = uuid.uuid4().hex[:8], []
    async with AsyncRolloutClient(url, api_key=cfg.api_key) as client:
        with Pusher(client, cfg.push, cfg.master_address) as pusher:
            base = await asyncio.to_thread(pusher.start, policy, head)
            mark = time.perf_counter()
            pending = asyncio.create_task(rollout(client, cfg, tok, 0, run_id))
            try:
                for step in range(cfg.steps):
                    ro = await pending
                    more = step + 1 < cfg.steps
                    if cfg.async_mode and more:  # the next rollouts overlap this update
                        pending = asyncio.create_task(rollout(client, cfg, tok, step + 1, run_id))
                    rec = await asyncio.to_thread(train_and_push, ro, policy, opt, head, head_opt,
                                                  pusher, cfg, base + step)  # fmt: skip
                    if not cfg.async_mode and more:
                        pending = asyncio.create_task(rollout(client, cfg, tok, step + 1, run_id))
                    now = time.perf_counter()
                    rec = {"step": step, "policy_version": base + step, "temperature":
                           ro.temperature, "rollout_s": ro.seconds, "step_s": now - mark,
                           **ro.window, **rec}  # fmt: skip
                    mark = now
                    records.append(rec)
                    append_jsonl(steps_path, rec)
                    if not cfg.quiet:
                        print(log_line(rec), flush=True)
            finally:
                if not pending.done():
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if cfg.plot and records:
        plot_run(records, out / "grpo.png")
    return records
