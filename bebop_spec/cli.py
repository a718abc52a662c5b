"""`bebop` command line. Subcommands import their modules lazily so `--help` stays fast.

bebop serve [--model DIR] ...          rollout server (default model: the built-in demo)
bebop generate --prompt TEXT ...       offline generation with speculative stats
bebop demo build                       build the demo model (cached)
bebop model fetch [--cache-dir DIR]    obtain + convert SmolLM2-135M-Instruct (cached)
bebop mtp data|train|eval|export ...   pre-RL MTP head training with the e2e TV loss
bebop patch vllm|sglang ...            apply Bebop's patches to an installed engine
bebop analyze ...                      acceptance-vs-entropy analysis
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _cmd_serve(argv: list[str]) -> int:
    from bebop_spec.server.cli import add_serve_args, run_serve

    parser = argparse.ArgumentParser(prog="bebop serve", description="Run the rollout server.")
    add_serve_args(parser)
    return run_serve(parser.parse_args(argv))


GENERATE_OPTIONS = ["mtp", "draft_mode", "num_speculative_tokens", "spec_policy", "draft_vocab_size", "dtype",
                    "device", "threads"]  # fmt: skip


def _cmd_generate(argv: list[str]) -> int:
    from bebop_spec.config_args import add_config_args, config_kwargs
    from bebop_spec.engine.config import (
        DRAFT_MODE_OFF,
        DRAFT_MODES,
        SPEC_POLICIES,
        EngineConfig,
    )
    from bebop_spec.hardware import DTYPES

    parser = argparse.ArgumentParser(
        prog="bebop generate", description="Generate offline with the embedded engine."
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF model dir, or 'demo' (default: SmolLM2-135M-Instruct + head)",
    )
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    add_config_args(parser, EngineConfig, GENERATE_OPTIONS, choices={
        "draft_mode": [*DRAFT_MODES, DRAFT_MODE_OFF], "spec_policy": list(SPEC_POLICIES),
        "dtype": list(DTYPES)})  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    args = parser.parse_args(argv)

    from bebop_spec import LLM, SamplingParams

    llm = LLM(args.model, **config_kwargs(args, GENERATE_OPTIONS))
    prompts = args.prompt
    if args.chat:
        tok = llm.tokenizer
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )  # fmt: skip
            for p in prompts
        ]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, n=args.n, seed=args.seed)  # fmt: skip
    for out in llm.generate(prompts, params):
        for c in out.outputs:
            print(f"--- [{c.index}] finish={c.finish_reason} tokens={len(c.token_ids)}")
            print(c.text if llm.tokenizer is not None else c.token_ids)
    s = llm.spec_stats
    if s.num_drafts:
        per_pos = [round(a / s.num_drafts, 3) for a in s.accepted_per_pos]
        print(f"acceptance {s.acceptance_rate:.3f}  mean accepted length "
              f"{s.mean_accepted_length:.2f}  per position {per_pos}")  # fmt: skip
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from bebop_spec.demo.cli import main as demo_main

    return demo_main(argv)


def _cmd_model(argv: list[str]) -> int:
    from bebop_spec.models.cli import main as model_main

    return model_main(argv)


def _cmd_mtp(argv: list[str]) -> int:
    from bebop_spec.train.cli import main as mtp_main

    return mtp_main(argv)


def _cmd_patch(argv: list[str]) -> int:
    from bebop_spec.patching import main_patch

    return main_patch(argv)


def _cmd_analyze(argv: list[str]) -> int:
    from bebop_spec.analysis.cli import main as analyze_main

    return analyze_main(argv)


def _cmd_consistency(argv: list[str]) -> int:
    try:
        from bebop_client.consistency import main as consistency_main
    except ImportError:
        print("bebop consistency needs the client: pip install ./clients", file=sys.stderr)
        return 2
    return consistency_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_cmd_serve, "run the rollout server (OpenAI + SGLang-native + weight sync)"),
    "generate": (_cmd_generate, "offline generation with speculative stats"),
    "demo": (_cmd_demo, "build / inspect the built-in demo model"),
    "model": (_cmd_model, "obtain the real default model (SmolLM2-135M-Instruct, cached)"),
    "mtp": (_cmd_mtp, "MTP head: self-distillation data, training, evaluation, export"),
    "patch": (_cmd_patch, "apply / check / revert Bebop's vLLM or SGLang patches"),
    "analyze": (_cmd_analyze, "acceptance-vs-entropy analysis of metrics or JSONL records"),
    "consistency": (_cmd_consistency, "trainer vs server logprobs on sampled rollouts (mismatch)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Idle OpenMP threads sleep instead of spinning: with spinning, torch on a small shared
    # CPU runs up to 5x slower (docs/engines.md). Read once when torch loads, hence here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bebop <command> [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        print("\nRun `bebop <command> --help` for a command's options.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bebop: unknown command {name!r}; see `bebop --help`", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip interpreter finalization: gloo's worker threads can still be
        # joinable when the process group's last reference dies there, and the rank then
        # aborts ("terminate called without an active exception", exit -6) after its work
        # is done and saved (seen once in CI, 2026-12-04; the run is complete by then).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
