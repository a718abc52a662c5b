"""`bebop demo`: build or inspect the built-in demo model (target + e2e-TV MTP head).

bebop demo build [--force] [--seed 0] [--cache-dir DIR] [--steps N] [--no-head]
bebop demo info
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from bebop_spec.demo.build import DemoBuildConfig, build_demo, ensure_demo, is_built


def _head_trainer():
    from bebop_spec.train import demo_head_stage

    return demo_head_stage


def default_model(progress: bool = True) -> tuple[Path, Path]:
    """(target_dir, head_dir) of the demo model, building whatever is missing (cached)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/demo.md: no spinning threads
    cfg = DemoBuildConfig()
    target = ensure_demo(cfg, train_head=_head_trainer(), progress=progress)
    return target, cfg.head_dir


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bebop demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the demo model (each stage cached)")
    b.add_argument("--force", action="store_true", help="rebuild every stage")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cache-dir", type=Path, default=None,
                   help="default: $BEBOP_CACHE_DIR/demo or ~/.cache/bebop/demo")  # fmt: skip
    b.add_argument("--steps", type=int, default=None, help="target training steps")
    b.add_argument("--no-head", action="store_true", help="skip the MTP head stage")
    info = sub.add_parser("info", help="where the demo lives and its evaluation report")
    info.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    cfg = DemoBuildConfig(cache_dir=args.cache_dir)
    if args.cmd == "info":
        built = is_built(cfg, _head_trainer())
        print(f"target: {cfg.target_dir}\nhead:   {cfg.head_dir}\nbuilt:  {built}")
        if cfg.report_path.exists():
            print(json.dumps(json.loads(cfg.report_path.read_text()), indent=2))
        return 0
    cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, steps=args.steps))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    path = build_demo(cfg, force=args.force, train_head=None if args.no_head else _head_trainer())
    print(f"demo target: {path}\ndemo head:   {cfg.head_dir}")
    print(f"built in {time.perf_counter() - start:.0f} s")
    return 0
