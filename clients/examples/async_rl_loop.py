"""A minimal asynchronous RL loop: GRPO against a Bebop rollout server, in one screen.

The full example is `grpo.py` next to this file (demo math task with a verifiable reward,
gloo weight pushes, staleness bound, online MTP-head updates, JSONL logs and plots); this
one keeps the bare loop and shares its loss and advantages (`grpo_trainer`).

    pip install ./clients        # or PYTHONPATH=clients:. from the repository root
    python clients/examples/async_rl_loop.py              # starts a local server on a tiny model
    python clients/examples/async_rl_loop.py --url http://127.0.0.1:30000 --model /path/to/model

The trainer holds its own copy of the policy (Hugging Face transformers, torch). Each step:
rollouts for step k+1 are already in flight while step k trains (one step off-policy, as in
AReaL / slime's async mode); the PPO ratio uses the server's per-token logprobs, which are
exact for whichever weight version sampled each token; then the new weights are pushed over
HTTP (generation pauses in place, in-flight samples resume on the new weights, and their
per-token `weight_versions` show it). Reward: the fraction of completion tokens equal to
`--target-token`, so learning is visible in a few steps on a random tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from bebop_client import AsyncRolloutClient, Sample, WeightSync

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_trainer import group_advantages, grpo_loss  # noqa: E402


def args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one on a tiny model)")
    p.add_argument("--model", help="HF model dir the server serves (needed with --url)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--target-token", type=int, default=7)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=0.2)
    return p


def reward(s: Sample, target: int) -> float:
    return sum(t == target for t in s.token_ids) / max(1, s.num_tokens)


async def rollout(client: AsyncRolloutClient, args, step: int) -> list[list[Sample]]:
    rng = random.Random(step)
    prompts = [[rng.randrange(1, 60) for _ in range(6)] for _ in range(args.prompts)]
    params = {"temperature": 1.0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    return await client.generate_batch(prompts, params, n=args.group, rid=f"step{step}")


def train_step(policy, opt, groups: list[list[Sample]], args) -> dict:
    """GRPO: advantages = group-normalised rewards; PPO-clipped ratio vs the behaviour
    logprobs the server returned (per token)."""
    losses, drift = [], 0.0
    for group in groups:
        advantages = group_advantages([reward(s, args.target_token) for s in group])
        for s, a in zip(group, advantages, strict=True):
            ids = torch.tensor([s.prompt_ids + s.token_ids])
            logits = policy(ids).logits[0, len(s.prompt_ids) - 1 : -1].float()
            new = torch.log_softmax(logits, -1).gather(-1, ids[0, len(s.prompt_ids) :, None])[:, 0]
            old = torch.tensor(s.logprobs)
            drift = max(drift, float((new.detach() - old).abs().max()))
            ones = torch.ones_like(old)
            losses.append(grpo_loss(new, old, a * ones, ones, args.clip) / old.numel())
    loss = torch.stack(losses).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()), "max_logprob_drift": drift}


async def run(url: str, model_dir: str, args) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).float()
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    async with AsyncRolloutClient(url) as client:
        sync = WeightSync(client, selector="target")  # pauses in place around each push
        served = (await client.weight_versions()).values()
        base = max((int(v) for v in served if v.isdigit()), default=0)  # versions only go up
        pending = asyncio.create_task(rollout(client, args, 0))
        for step in range(args.steps):
            t0 = time.perf_counter()
            groups = await pending
            if step + 1 < args.steps:  # the next rollouts run while this step trains
                pending = asyncio.create_task(rollout(client, args, step + 1))
            samples = [s for g in groups for s in g]
            mean_r = sum(reward(s, args.target_token) for s in samples) / len(samples)
            stats = await asyncio.to_thread(train_step, policy, opt, groups, args)
            state = {k: v.detach() for k, v in policy.state_dict().items()}
            version = await asyncio.to_thread(
                sync.push_tensor, state, weight_version=base + step + 1
            )
            m = await client.metrics()
            mixed = sum(s.mixed_versions for s in samples)
            print(f"step {step}: reward {mean_r:.3f}  loss {stats['loss']:+.3f}  "
                  f"max|logπ−logμ| {stats['max_logprob_drift']:.2e}  acceptance "
                  f"{m.acceptance_rate or 0:.3f}  samples across an update {mixed}/{len(samples)}  "
                  f"-> weights {version}  ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
        sync.close()
    return version


def main(argv: list[str] | None = None) -> int:
    args = args_parser().parse_args(argv)
    if args.url:
        if not args.model:
            raise SystemExit("--model (the served model's directory) is needed with --url")
        asyncio.run(run(args.url, args.model, args))
        return 0
    from bebop_spec.server.testing import serve_model
    from bebop_spec.testing import make_tiny_model  # the full repo, for the local server

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(f"{tmp}/policy", vocab_size=64, seed=0)
        with serve_model(str(model), str(model / "mtp")) as (srv, _):
            asyncio.run(run(srv.url, str(model), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
