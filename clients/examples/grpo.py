"""GRPO on the demo math task against a Bebop rollout server, weights pushed over gloo each step.

    python clients/examples/grpo.py                          # demo model + its head, rs, async
    python clients/examples/grpo.py --steps 20 --group-size 8 --prompts-per-step 8 --out runs/g
    python clients/examples/grpo.py --server http://127.0.0.1:30000 --model DIR   # your server
    python clients/examples/grpo.py --draft-mode rs --mtp HEAD --online-head e2e_tv   # + head

The trainer is this process; the server is another (started here on a free loopback port with
`python -m bebop_spec.cli serve`, or reached with --server). The policy is a copy of the served
target (`bebop_spec.models.load_model`). Each step: rollouts (one /generate per sample, the
server's per-token logprobs and weight versions) -> verifiable reward (`#### answer`) ->
group-normalised advantages -> PPO-clipped update -> weights pushed to the server over a gloo
group (SGLang's /init_weights_update_group + /update_weights_from_distributed). In async mode
(default) step t+1's rollouts run while step t trains and pushes; tokens sampled more than
--max-staleness updates ago drop their sample, younger stale tokens weigh --stale-decay**lag.
With --online-head the trainer also trains the MTP head on the fresh rollouts (policy hiddens
detached) and pushes it with selector "draft".

Writes OUT/steps.jsonl (one record per step: reward, policy entropy, acceptance from /metrics
deltas, mean accepted length, rollout / train / push / step time, staleness) and OUT/grpo.png.
Errors (server unreachable, version conflict, names the server refuses) end in one line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

# OpenMP threads spinning on a busy machine slow torch down several-fold (demo/target.py);
# read when torch loads, and inherited by the server subprocess.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import bebop_client  # noqa: F401  (pip install ./clients)
except ImportError:
    sys.path.insert(0, str(HERE.parent))

from bebop_client import BebopClientError, ServerUnreachable  # noqa: E402
from grpo_config import GRPOConfig, args_parser, config_from_args  # noqa: E402
from grpo_server import ServerStartError, launch_server, wait_healthy  # noqa: E402

from bebop_spec.errors import BebopError  # noqa: E402


def _train(cfg: GRPOConfig, url: str) -> list[dict]:
    import torch  # the heavy imports wait until a server is known to answer
    from grpo_loop import run

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return asyncio.run(run(cfg, url))


def execute(cfg: GRPOConfig) -> list[dict]:
    """Connect to --server (ServerUnreachable unless it answers /health) or start one."""
    if cfg.server:
        try:
            wait_healthy(cfg.server.rstrip("/"), None, None, timeout_s=3.0)
        except ServerStartError as exc:
            raise ServerUnreachable(f"no healthy Bebop server at {cfg.server}", [cfg.server],
                                    1) from exc  # fmt: skip
        return _train(cfg, cfg.server.rstrip("/"))
    with launch_server(cfg.model, mtp=cfg.mtp, draft_mode=cfg.draft_mode, gamma=cfg.gamma,
                       spec_policy=cfg.spec_policy, log_path=Path(cfg.out) / "server.log",
                       seed=cfg.seed,
                       max_num_seqs=cfg.max_num_seqs) as url:  # fmt: skip
        return _train(cfg, url)


ERRORS = (BebopClientError, ServerStartError, BebopError, ValueError, FileNotFoundError)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: the server subprocess is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    args = args_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        execute(config_from_args(args))
    except ERRORS as exc:
        if os.environ.get("BEBOP_DEBUG"):
            raise
        text = str(exc).strip()
        print(f"grpo: error: {text.splitlines()[0] if text else type(exc).__name__}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
