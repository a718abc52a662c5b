"""`bebop mtp ...`: pre-RL MTP head training (docs/mtp_training.md).

    bebop mtp data   --model DIR --out data/train --num-prompts 256 --temperature 1.0 --max-tokens 256
    bebop mtp data   --model DIR --out data/heldout --split heldout --num-prompts 32
    bebop mtp train  --model DIR --data data/train --loss e2e_tv --gamma 3 --out runs/mtp
    bebop mtp eval   --model DIR --mtp runs/mtp/head --data data/heldout --out runs/eval
    bebop mtp export --head runs/mtp/head --model DIR --layout qwen3_next --out export/head

Bad input (missing or corrupt data, a head that does not fit the target, a tokenizer that does
not match the model, gamma < 1, ...) ends with a one-line `error:` message and exit code 1;
usage mistakes exit with 2 (argparse). `BEBOP_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------- data


def _data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bebop mtp data",
                                description="Self-distillation data: responses sampled from the "
                                "target at the RL temperature, loss on the response tokens.")  # fmt: skip
    p.add_argument("--model", required=True, help="target model directory")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--num-prompts", type=_positive_int, default=256,
                   help="prompts per domain (at most this many from --prompts)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=_positive_int, default=256)
    p.add_argument("--domains", type=_csv, default=("math", "code", "agent"),
                   help="demo-corpus domains, comma-separated")  # fmt: skip
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--prompts", default=None, help="JSONL of user prompts instead of the corpus")
    p.add_argument("--corpus", default=None, help="demo corpus dir (default: the demo cache)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--samples-per-prompt", type=_positive_int, default=1)
    p.add_argument("--max-num-seqs", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("sampling from running servers (instead of the embedded engine)")
    r.add_argument("--server", action="append", default=None, metavar="URL",
                   help="server base URL, repeatable to spread the load; resumable "
                   "(OUT/samples.jsonl); --model is then the local target dir, for its "
                   "tokenizer")  # fmt: skip
    r.add_argument("--server-api", default="openai", choices=["openai", "sglang"],
                   help="openai: /v1/completions with token ids; sglang: /generate")  # fmt: skip
    r.add_argument("--concurrency", type=_positive_int, default=16, help="requests in flight")
    r.add_argument("--max-retries", type=int, default=5,
                   help="per request, on connection errors, HTTP 429 / 5xx and aborts")  # fmt: skip
    r.add_argument("--api-key", default=os.environ.get("BEBOP_API_KEY"),
                   help="bearer key of the servers (default: $BEBOP_API_KEY)")  # fmt: skip
    r.add_argument("--skip-tokenizer-check", action="store_true",
                   help="sample even if the servers cannot show they use the target's tokenizer")  # fmt: skip
    _common(p)
    return p


def cmd_data(argv: list[str]) -> int:
    args = _data_parser().parse_args(argv)
    from bebop_spec.train.selfdistill import DataConfig, generate_dataset

    cfg = DataConfig(model=args.model, out=args.out, num_prompts=args.num_prompts,
                     temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                     domains=args.domains, prompts=args.prompts, split=args.split,
                     corpus=args.corpus, tokenizer=args.tokenizer,
                     samples_per_prompt=args.samples_per_prompt, seed=args.seed,
                     max_num_seqs=args.max_num_seqs, device=args.device,
                     dtype=args.dtype)  # fmt: skip
    _setup(args)
    if args.server:
        from bebop_spec.train.remote_data import RemoteDataConfig, generate_remote_dataset

        remote = RemoteDataConfig(cfg, servers=tuple(args.server), api=args.server_api,
                                  concurrency=args.concurrency, max_retries=args.max_retries,
                                  api_key=args.api_key,
                                  skip_tokenizer_check=args.skip_tokenizer_check)  # fmt: skip
        meta = generate_remote_dataset(remote, progress=not args.quiet)
    else:
        meta = generate_dataset(cfg, progress=not args.quiet)
    print(f"wrote {meta.num_sequences} sequences ({meta.num_response_tokens} response tokens of "
          f"{meta.num_tokens}) to {args.out}; domains {meta.domains}; finish "
          f"{meta.extra['finish_reasons']}")  # fmt: skip
    return 0


# ---------------------------------------------------------------- train


def _train_parser() -> argparse.ArgumentParser:
    from bebop_spec.train.losses import LOSSES
    from bebop_spec.train.trainer import COMPUTE_DTYPES, LAYOUTS

    p = argparse.ArgumentParser(prog="bebop mtp train",
                                description="Train an MTP head on self-distillation data.")  # fmt: skip
    p.add_argument("--model", required=True, help="target model directory (frozen)")
    p.add_argument("--data", required=True, help="dataset from `bebop mtp data`")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, head/, log, png)")
    p.add_argument("--loss", default="e2e_tv", choices=sorted(LOSSES))
    p.add_argument("--gamma", type=int, default=3, help="chain length trained (>= 1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--max-chains", type=int, default=0, help="chains per batch (0: all)")
    p.add_argument("--chunk-size", type=int, default=8192, help="vocab chunk of the TV losses")
    p.add_argument("--layout", default="qwen3_next", choices=list(LAYOUTS))
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--chain-context", default="serve", choices=["serve", "causal"],
                   help="attention context of the training chain: 'serve' = the engine's "
                        "(one-layer heads), 'causal' = the older approximation")  # fmt: skip
    p.add_argument("--init-from", default=None,
                   help="'last_layer' (a copy of the target's last layer, fc passing the "
                   "hidden through), 'target' (the model's own head) or a head dir; "
                   "default: fresh")  # fmt: skip
    p.add_argument("--draft-vocab", default=None, metavar="DIR",
                   help="train drafting over DIR/draft_vocab.json's top --draft-vocab-size "
                   "tokens, as the engine serves it (bebop mtp draft-vocab)")  # fmt: skip
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also export the head every N steps to OUT/snapshots/step_N, for "
                   "learning curves (benchmarks/learning_curve.py); 0: none")  # fmt: skip
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint (a fresh start when there is none)")  # fmt: skip
    g.add_argument("--overwrite", action="store_true",
                   help="discard OUT's checkpoint and log and start again")  # fmt: skip
    s = p.add_argument_group("throughput and scale-out (torchrun: docs/distributed_training.md)")
    s.add_argument("--compute-dtype", default="float32", choices=list(COMPUTE_DTYPES),
                   help="forward matmuls; bfloat16 = autocast over float32 master weights")  # fmt: skip
    s.add_argument("--shard-target", action="store_true",
                   help="under torchrun, shard the frozen target's layers over the ranks (FSDP2)")  # fmt: skip
    s.add_argument("--cache-hiddens", default=None, metavar="DIR",
                   help="run the target once over the data, cache its hidden states in DIR "
                   "(safetensors; size printed) and train from them")  # fmt: skip
    _common(p)
    return p


def cmd_train(argv: list[str]) -> int:
    args = _train_parser().parse_args(argv)
    from bebop_spec.train.trainer import LOG_FILE, TrainConfig, plot_training_curve, train_mtp

    cfg = TrainConfig(model=args.model, data=args.data, out=args.out, loss=args.loss,
                      gamma=args.gamma, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, warmup=args.warmup, grad_clip=args.grad_clip,
                      seed=args.seed, init_from=args.init_from, save_every=args.save_every,
                      snapshot_every=args.snapshot_every,
                      layout=args.layout, chunk_size=args.chunk_size, log_every=args.log_every,
                      num_layers=args.num_layers, max_chains=args.max_chains,
                      weight_decay=args.weight_decay, min_lr_ratio=args.min_lr_ratio,
                      device=args.device, dtype=args.dtype,
                      chain_context=args.chain_context, compute_dtype=args.compute_dtype,
                      shard_target=args.shard_target, cache_hiddens=args.cache_hiddens,
                      draft_vocab=args.draft_vocab,
                      draft_vocab_size=args.draft_vocab_size)  # fmt: skip
    ckpt = cfg.out_dir / "checkpoint"
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    if ckpt.exists() and args.overwrite and main:
        shutil.rmtree(ckpt)
        (cfg.out_dir / LOG_FILE).unlink(missing_ok=True)
    elif ckpt.exists() and not args.resume and main:  # others: rank 0 may be clearing it
        raise ValueError(f"{cfg.out_dir} already holds a checkpoint: pass --resume to continue "
                         "it or --overwrite to start again")  # fmt: skip
    _setup(args)
    result = train_mtp(cfg)
    if not main:
        return 0
    png = plot_training_curve(result.log_path, cfg.out_dir / "training_curve.png")
    alpha = "/".join(f"{a:.3f}" for a in result.alpha)
    print(f"step {result.step}: loss {result.loss:.4f}, soft acceptance α {alpha}, E[A] "
          f"{result.accepted_length:.3f}; head -> {result.head_dir}; curve -> {png}")  # fmt: skip
    return 0


# ---------------------------------------------------------------- eval


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bebop mtp eval",
                                description="Acceptance per position under rs and to, per "
                                "temperature and domain: analytic on held-out chains and "
                                "measured with the engine.")  # fmt: skip
    p.add_argument("--model", required=True, help="target model directory")
    p.add_argument("--mtp", default=None, help="head directory (default: the model's own)")
    p.add_argument("--data", required=True, help="held-out dataset from `bebop mtp data`")
    p.add_argument("--out", default=None, help="directory for eval.json and the plot")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 1.0])
    p.add_argument("--modes", nargs="+", default=["rs", "to"], choices=["rs", "to"])
    p.add_argument("--domains", type=_csv, default=None, help="default: all of the dataset's")
    p.add_argument("--no-analytic", action="store_true")
    p.add_argument("--no-measured", action="store_true")
    p.add_argument("--max-sequences", type=int, default=0, help="analytic, per domain (0: all)")
    p.add_argument("--measure-prompts", type=int, default=16, help="measured, per domain")
    p.add_argument("--max-tokens", type=int, default=128, help="measured, per prompt")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="q over the head's K most frequent tokens, as the engine serves it "
                   "(default: the head's own, its draft_vocab.json; 0: the full vocabulary)")  # fmt: skip
    _common(p)
    return p


def cmd_eval(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    from bebop_spec.train.evaluate import EvalConfig, evaluate, format_table, write_results

    cfg = EvalConfig(model=args.model, mtp=args.mtp, data=args.data, gamma=args.gamma,
                     temperatures=tuple(args.temperatures), modes=tuple(args.modes),
                     domains=args.domains, analytic=not args.no_analytic,
                     measured=not args.no_measured, max_sequences=args.max_sequences,
                     measure_prompts=args.measure_prompts, max_tokens=args.max_tokens,
                     seq_len=args.seq_len, top_p=args.top_p, seed=args.seed,
                     device=args.device, dtype=args.dtype,
                     draft_vocab_size=args.draft_vocab_size)  # fmt: skip
    _setup(args)
    rows = evaluate(cfg, progress=not args.quiet)
    print(format_table(rows))
    if args.out:
        path = write_results(rows, cfg, args.out)
        print(f"results -> {path}")
    return 0


# ---------------------------------------------------------------- export


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bebop mtp export",
                                description="Write a head in the layout vLLM / SGLang loaders "
                                "read (docs/serving_heads.md).")  # fmt: skip
    p.add_argument("--head", required=True, help="trained head directory (e.g. RUN/head)")
    p.add_argument("--model", required=True, help="the target it was trained for")
    p.add_argument("--layout", required=True, choices=["qwen3_next", "deepseek_v3"])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the tensors (default: as stored)")  # fmt: skip
    p.add_argument("--convert", action="store_true",
                   help="allow a layout change (not exact at position 0; see the docs)")  # fmt: skip
    p.add_argument("--into-target", action="store_true",
                   help="write a copy of the target with the head mixed in (Qwen3.5 style)")  # fmt: skip
    p.add_argument("--no-shared-copies", action="store_true",
                   help="omit the copies of the target's embedding / LM head")  # fmt: skip
    return p


def cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    from bebop_spec.train.export import export_head

    out = export_head(args.head, args.model, args.layout, args.out, dtype=args.dtype,
                      convert=args.convert, into_target=args.into_target,
                      shared_copies=not args.no_shared_copies)  # fmt: skip
    print(f"exported {args.layout} head -> {out}")
    return 0


# ---------------------------------------------------------------- dispatch


def cmd_recipe(argv: list[str]) -> int:
    from bebop_spec.train.recipes import RECIPES, build

    p = argparse.ArgumentParser(prog="bebop mtp recipe",
                                description="Rebuild a shipped head from its recipe.")  # fmt: skip
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="directory for the head, its logs and summary")
    p.add_argument("--dataset", default=None, help="reuse this self-distillation dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    out = build(args.name, args.out, dataset=args.dataset, progress=not args.quiet)
    print(f"head -> {out}")
    return 0


def cmd_draft_vocab(argv: list[str]) -> int:
    from bebop_spec.train.draft_vocab import cmd_draft_vocab as run

    return run(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "data": (cmd_data, "self-distillation data from the target (demo corpus or --prompts)"),
    "train": (cmd_train, "train a head (ce | fkl | rkl | tv | e2e_tv | nla | lk), resumable"),
    "eval": (cmd_eval, "acceptance per position: analytic and measured, rs and to"),
    "export": (cmd_export, "write the head in the qwen3_next or deepseek_v3 layout"),
    "recipe": (cmd_recipe, "rebuild a shipped head from its recipe (e.g. smollm2)"),
    "draft-vocab": (cmd_draft_vocab, "rank the tokens a head drafts (--draft-vocab-size)"),
}


def _usage() -> str:
    lines = ["usage: bebop mtp <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `bebop mtp`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bebop mtp: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    # Threads that spin while a sibling is descheduled slow shared CPUs down (demo/target.py);
    # only takes effect if torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bebop_spec.errors import BebopError

    try:
        return COMMANDS[name][0](rest)
    except (ValueError, BebopError, FileNotFoundError) as e:
        if os.environ.get("BEBOP_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bebop mtp {name}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
