"""Options of the GRPO example: a validated dataclass, its argparse front end, demo defaults.

    cfg = config_from_args(args_parser().parse_args(["--steps", "4"]))
    cfg.temperature_at(step)          # the linear sampling-temperature schedule

Bad combinations raise ValueError with the offending option's name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bebop_spec.engine.config import DRAFT_MODE_OFF, SPEC_POLICIES, SpecPolicy
from bebop_spec.engine.config import DRAFT_MODES as SPEC_DRAFT_MODES

DRAFT_MODES = (*SPEC_DRAFT_MODES, DRAFT_MODE_OFF)  # what --draft-mode takes: the engine's, or off
ONLINE_HEAD_LOSSES = ("ce", "tv", "e2e_tv")
PUSH_METHODS = ("distributed", "tensor")


@dataclass
class GRPOConfig:
    model: str  # the served target's directory (the trainer loads its own copy)
    out: str = "runs/grpo"
    mtp: str | None = None  # MTP head directory served as the draft (and trained online)
    draft_mode: str = "rs"
    server: str | None = None  # a running server; None: start one
    api_key: str | None = None
    steps: int = 10
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 128
    lr: float = 2e-5
    temperature: float = 1.0
    temperature_end: float | None = None  # linear schedule to this value at the last step
    entropy_coef: float = 0.0  # entropy bonus: loss −= coef · mean token entropy
    clip: float = 0.2
    seed: int = 0
    async_mode: bool = True
    max_staleness: int = 1  # drop a sample holding a token older than this many updates
    stale_decay: float = 1.0  # weight of a token sampled `lag` updates ago: decay**lag
    online_head: str | None = None  # ce | tv | e2e_tv: train the head during RL
    head_lr: float = 3e-4
    gamma: int = 3
    spec_policy: str = SpecPolicy.AUTO.value  # the server's: auto (γ_t per step) | fixed
    push: str = "distributed"
    master_address: str = "127.0.0.1"  # the trainer's address as the server sees it
    max_ops: int = 2  # problem difficulty: 1..max_ops operations
    level: int | None = 0  # numbers up to 9 / 20 / 50 (0 / 1 / 2); None: mixed
    micro_batch: int = 16
    max_num_seqs: int = 64
    threads: int | None = None
    quiet: bool = False
    plot: bool = True

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "group_size", "max_tokens", "gamma",
                    "micro_batch", "max_num_seqs")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        checks = [
            (self.draft_mode in DRAFT_MODES, f"--draft-mode must be one of {DRAFT_MODES}"),
            (self.push in PUSH_METHODS, f"--push must be one of {PUSH_METHODS}"),
            (self.online_head in (None, *ONLINE_HEAD_LOSSES),
             f"--online-head must be one of {ONLINE_HEAD_LOSSES}"),
            (self.lr > 0 and self.head_lr > 0, "learning rates must be > 0"),
            (self.temperature > 0 and (self.temperature_end or 1) > 0, "temperatures must be > 0"),
            (self.max_staleness >= 0 and 0 < self.stale_decay <= 1,
             "--max-staleness must be >= 0 and --stale-decay in (0, 1]"),
            (not (self.online_head and self.draft_mode == "none"),
             "--online-head needs a draft mode (rs or to) and --mtp"),
            (self.draft_mode == "none" or self.server or self.mtp,
             "--draft-mode rs/to needs --mtp HEAD_DIR (or --draft-mode none)"),
            (not self.online_head or self.mtp, "--online-head needs --mtp (the served head)"),
            (1 <= self.max_ops <= 4, "--max-ops must be in 1..4"),
            (self.level in (None, 0, 1, 2), "--level must be 0, 1 or 2"),
        ]  # fmt: skip
        for ok, why in checks:
            if not ok:
                raise ValueError(why)

    def temperature_at(self, step: int) -> float:
        if self.temperature_end is None or self.steps == 1:
            return self.temperature
        frac = step / (self.steps - 1)
        return self.temperature + (self.temperature_end - self.temperature) * frac

    def sample_seed(self, step: int, prompt: int) -> int:
        """sampling_seed of a group (the client adds the sample index)."""
        return (self.seed * 100_003 + step) * 10_007 + prompt * self.group_size


def args_parser(description: str = "GRPO against a Bebop server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a("--model", help="served target dir (default: the demo model, built once)")
    a("--mtp", help="MTP head dir (default: the demo's head when present)")
    a("--draft-mode", default="rs", choices=DRAFT_MODES)
    a("--server", help="URL of a running server (default: start one on a free port)")
    a("--api-key", help="admin token of --server")
    a("--out", default="runs/grpo", help="directory for steps.jsonl, grpo.png, server.log")
    a("--steps", type=int, default=10)
    a("--prompts-per-step", type=int, default=8)
    a("--group-size", type=int, default=8, help="samples per prompt (GRPO group)")
    a("--max-tokens", type=int, default=128)
    a("--lr", type=float, default=2e-5)
    a("--temperature", type=float, default=1.0)
    a("--temperature-end", type=float, help="linear schedule to this temperature")
    a("--entropy-coef", type=float, default=0.0, help="entropy bonus coefficient")
    a("--clip", type=float, default=0.2)
    a("--seed", type=int, default=0)
    a("--sync", action="store_true", help="no overlap: rollouts wait for the update")
    a("--max-staleness", type=int, default=1)
    a("--stale-decay", type=float, default=1.0)
    a("--online-head", choices=ONLINE_HEAD_LOSSES, help="also train the MTP head online")
    a("--head-lr", type=float, default=3e-4)
    a("--gamma", type=int, default=3, help="speculative tokens per step")
    a(
        "--spec-policy",
        default=SpecPolicy.AUTO.value,
        choices=SPEC_POLICIES,
        help="the launched server's draft-length policy (fixed: every step drafts --gamma)",
    )
    a("--push", default="distributed", choices=PUSH_METHODS, help="gloo group or HTTP body")
    a("--master-address", default="127.0.0.1", help="trainer address for the gloo group")
    a("--max-ops", type=int, default=2, help="operations per problem (1-4)")
    a("--level", type=int, default=0, help="number size 0/1/2 (-1: mixed)")
    a("--micro-batch", type=int, default=16)
    a("--max-num-seqs", type=int, default=64, help="server batch (started server only)")
    a("--threads", type=int, help="trainer torch threads")
    a("--quiet", action="store_true")
    a("--no-plot", action="store_true")
    return p


def _demo_defaults(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model, mtp): the demo model (built if missing) and its head when one was built."""
    model, mtp = args.model, args.mtp
    if model is None:
        from bebop_spec.demo.build import DemoBuildConfig, ensure_demo

        model = str(ensure_demo())
        head = DemoBuildConfig().head_dir
        if mtp is None and (head / "model.safetensors").exists():
            mtp = str(head)
    return model, mtp


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    model, mtp = _demo_defaults(args)
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model} does not exist")
    return GRPOConfig(
        model=model, out=args.out, mtp=mtp, draft_mode=args.draft_mode, server=args.server,
        api_key=args.api_key, steps=args.steps, prompts_per_step=args.prompts_per_step,
        group_size=args.group_size, max_tokens=args.max_tokens, lr=args.lr,
        temperature=args.temperature, temperature_end=args.temperature_end,
        entropy_coef=args.entropy_coef, clip=args.clip, seed=args.seed,
        async_mode=not args.sync, max_staleness=args.max_staleness,
        stale_decay=args.stale_decay, online_head=args.online_head, head_lr=args.head_lr,
        gamma=args.gamma, spec_policy=args.spec_policy, push=args.push, master_address=args.master_address,
        max_ops=args.max_ops, level=None if args.level < 0 else args.level,
        micro_batch=args.micro_batch, max_num_seqs=args.max_num_seqs, threads=args.threads,
        quiet=args.quiet, plot=not args.no_plot,
    )  # fmt: skip
