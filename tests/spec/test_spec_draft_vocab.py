"""Draft vocabulary (spec/draft_vocab.py): the ranking, the logits expansion, the engine's
cached LM-head rows following weight updates, and `bebop mtp draft-vocab`. Exactness under a
draft vocabulary is the `vocab-*` configurations of tests/engine/test_engine_exactness.py."""

from __future__ import annotations

import json
import shutil

import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.models.mtp_io import save_draft_vocab
from bebop_spec.spec.draft_vocab import expand_draft_logits, rank_tokens
from bebop_spec.train.data import DistillSample, write_dataset
from bebop_spec.train.draft_vocab import cmd_draft_vocab


def test_rank_tokens_by_count_then_id():
    """Most frequent first; equal counts (including the unseen) in id order."""
    assert rank_tokens(torch.tensor([0, 5, 2, 5, 0, 1])) == [1, 3, 2, 5, 0, 4]


def test_expand_puts_minus_inf_outside():
    """logits[B, V] hold the K draft logits at their ids and −∞ (q = 0) everywhere else."""
    sub = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    full = expand_draft_logits(sub, torch.tensor([3, 0]), 5)
    assert full[:, [3, 0]].tolist() == sub.tolist()
    assert torch.isinf(full[:, [1, 2, 4]]).all() and (full[:, [1, 2, 4]] < 0).all()


def test_drafts_stay_in_the_vocabulary_and_follow_weight_updates(tiny_model, tmp_path):
    """With draft_vocab_size = 8 of 64, every drafted token is one of the 8 (greedy drafting
    through the `to` mode proposes the argmax of q, so a draft outside would show), and a
    weight update of the LM head's rows is what the next draft reads."""
    head = tmp_path / "mtp"
    shutil.copytree(tiny_model / "mtp", head)
    save_draft_vocab(head, list(range(63, -1, -1)))  # the 8 "most frequent": 56..63
    llm = LLM(str(tiny_model), mtp=str(head), draft_mode="to", spec_policy="fixed",
              draft_vocab_size=8)  # fmt: skip
    runner = llm.engine.runner
    seen: list[torch.Tensor] = []
    real = runner._draft

    def spy(*args, **kwargs):
        drafts, q = real(*args, **kwargs)
        seen.append(drafts)
        return drafts, q

    runner._draft = spy
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.0, seed=0))
    assert seen and all(((d >= 56) & (d <= 63)).all() for d in seen)
    name = "model.embed_tokens.weight" if runner.target.lm_head is None else "lm_head.weight"
    new = runner.target.lm_head_weight.detach().clone() * 2
    llm.engine.update_weights({name: new})
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, seed=0))
    assert torch.equal(runner._draft_weight, new[56:64])


def test_draft_vocab_command_counts_response_tokens(tiny_model, tmp_path, capsys):
    """`bebop mtp draft-vocab` ranks the dataset's response tokens (loss mask 1) first and
    records what it counted; prompt tokens do not count."""
    samples = [DistillSample([9, 9, 9, 5, 5, 7], [0, 0, 0, 1, 1, 1]),
               DistillSample([9, 5, 7, 7], [0, 1, 1, 1])]  # fmt: skip
    write_dataset(tmp_path / "ds", samples, model=str(tiny_model), temperature=1.0)
    assert cmd_draft_vocab(["--data", str(tmp_path / "ds"), "--head", str(tmp_path)]) == 0
    vocab = json.loads((tmp_path / "draft_vocab.json").read_text())
    assert vocab["token_ids"][:2] in ([5, 7], [7, 5]) and vocab["token_ids"][2] == 0
    assert vocab["tokens_counted"] == 6 and len(vocab["token_ids"]) == 64


def test_head_default_size_and_zero_for_full(tiny_model, tmp_path):
    """draft_vocab_size None takes the head's `default_size` from draft_vocab.json; 0 drafts
    over the full vocabulary; a head without the file drafts over the full vocabulary."""
    head = tmp_path / "mtp"
    shutil.copytree(tiny_model / "mtp", head)
    kw = {"mtp": str(head), "spec_policy": "fixed"}
    assert LLM(str(tiny_model), **kw).engine.runner.draft_ids is None
    save_draft_vocab(head, list(range(64)), default_size=16)
    assert LLM(str(tiny_model), **kw).engine.runner.draft_ids.tolist() == list(range(16))
    assert LLM(str(tiny_model), draft_vocab_size=0, **kw).engine.runner.draft_ids is None
