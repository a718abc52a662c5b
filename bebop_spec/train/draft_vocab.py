"""`bebop mtp draft-vocab`: rank the tokens a head drafts, from a self-distillation dataset.

    bebop mtp draft-vocab --data data/train --head HEAD_DIR        # writes HEAD_DIR/draft_vocab.json
    bebop serve --mtp HEAD_DIR --draft-vocab-size 8192             # draft over the top 8192

Counts the response tokens (loss mask 1) of the dataset: the tokens the policy samples at
the RL temperature, which the head must propose. Unseen tokens follow in id order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bebop_spec.models.mtp_io import DRAFT_VOCAB_FILE, save_draft_vocab
from bebop_spec.spec.draft_vocab import rank_tokens
from bebop_spec.train.data import read_dataset


def build_draft_vocab(data: str | Path, head: str | Path, vocab_size: int) -> Path:
    """Rank tokens by their count in `data`'s responses; write HEAD/draft_vocab.json."""
    ds = read_dataset(data)
    ids = ds.input_ids[ds.loss_mask.bool()].long()
    counts = torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    ranked = rank_tokens(counts)
    covered = {k: round(float(counts[ranked[:k]].sum()) / max(1, ids.numel()), 4)
               for k in (1024, 2048, 4096, 8192, 16384) if k < vocab_size}  # fmt: skip
    return save_draft_vocab(head, ranked, source=str(data), tokens_counted=int(ids.numel()),
                            coverage=covered)  # fmt: skip


def copy_draft_vocab(source: str | Path, head_dir: Path, size: int) -> None:
    """Write source's draft_vocab.json into head_dir with `size` as the head's default."""
    data = json.loads((Path(source) / DRAFT_VOCAB_FILE).read_text())
    head_dir.mkdir(parents=True, exist_ok=True)
    (head_dir / DRAFT_VOCAB_FILE).write_text(json.dumps({**data, "default_size": size}))


def cmd_draft_vocab(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bebop mtp draft-vocab", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset from `bebop mtp data`")
    p.add_argument("--head", required=True, help="head directory to write draft_vocab.json into")
    p.add_argument("--model", default=None, help="target directory (default: the dataset's)")
    args = p.parse_args(argv)
    from bebop_spec.models.loader import load_config

    model = args.model or read_dataset(args.data).meta.model
    path = build_draft_vocab(args.data, args.head, load_config(model).vocab_size)
    print(f"wrote {path}")
    return 0
