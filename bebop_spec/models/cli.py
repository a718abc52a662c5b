"""`bebop model`: obtain the real default model (SmolLM2-135M-Instruct) into the cache.

bebop model fetch [--cache-dir DIR] [--quiet]   convert once (cached), print the model directory

The directory goes to stdout alone (progress goes to stderr), so `MODEL=$(bebop model fetch)`
works in scripts. See docs/models.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bebop model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="download + convert SmolLM2-135M-Instruct (cached)")
    fetch.add_argument("--cache-dir", type=Path, default=None,
                       help="cache root (default: $BEBOP_CACHE_DIR or ~/.cache/bebop)")  # fmt: skip
    fetch.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)

    from bebop_spec.models.default_model import ensure_smollm2

    print(ensure_smollm2(args.cache_dir, progress=not args.quiet))
    return 0
