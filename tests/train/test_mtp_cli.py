"""`bebop mtp data | train` and the CLI's handling of bad input (bebop_spec.train.cli).

Tiny random Qwen3 targets made locally (bebop_spec.testing.make_tiny_model); demo-corpus prompts
come from a three-line corpus written here, so no demo build is needed.

Run: python -m pytest -q tests/train/test_mtp_cli.py
"""

from __future__ import annotations

import json

import pytest
import torch

from bebop_spec.cli import main as bebop
from bebop_spec.testing import make_tiny_model
from bebop_spec.train.data import read_dataset
from bebop_spec.train.trainer import read_log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """Random Qwen3 (hidden 32) with a byte-level BPE tokenizer and ChatML template, no head."""
    root = tmp_path_factory.mktemp("mtpcli")
    return make_tiny_model(root / "m", hidden_size=32, with_tokenizer=True, mtp_layout=None, seed=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A demo-format corpus directory: 3 math and 3 agent training prompts."""
    from bebop_spec.demo.corpus import Example

    d = tmp_path_factory.mktemp("corpus")
    qs = ["Ann has 3 apples. She eats 1. How many are left?", "What is 2 + 5?", "Add 4 and 4."]
    for domain in ("math", "agent"):
        lines = [
            Example(
                domain, [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]
            ).to_json()  # fmt: skip
            for q in qs
        ]
        (d / f"{domain}.train.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def dataset(text_model, tmp_path_factory):
    """Self-distilled data from a prompts file of token-id prompts (8 prompts x 24 tokens)."""
    out = tmp_path_factory.mktemp("ds") / "data"
    prompts = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 300, (5,), generator=gen).tolist(), "domain": "toy"}
            for _ in range(8)]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["mtp", "data", "--model", str(text_model), "--out", str(out), "--prompts",
            str(prompts), "--num-prompts", "8", "--max-tokens", "24", "--quiet"]  # fmt: skip
    assert bebop(argv) == 0
    return out, rows


def test_data_from_prompts_file_masks_the_response(dataset):
    """Every stored sequence is prompt + sampled response, with the loss mask exactly on the
    response and the prompt's ids unchanged; the meta records the temperature."""
    out, rows = dataset
    ds = read_dataset(out)
    assert len(ds) == len(rows) and ds.meta.domains == ["toy"] and ds.meta.temperature == 1.0
    for i, row in enumerate(rows):
        ids, mask = ds.sequence(i)
        n = len(row["input_ids"])
        assert ids[:n].tolist() == row["input_ids"]
        assert not mask[:n].any() and mask[n:].all() and 1 <= len(ids) - n <= 24


def test_data_from_demo_corpus_is_seeded(text_model, corpus, tmp_path):
    """Corpus prompts are chat-templated with a generation prompt; the same seed gives the same
    dataset (per-request seeded sampling), one domain per requested corpus domain."""
    outs = []
    for name in ("a", "b"):
        argv = ["mtp", "data", "--model", str(text_model), "--out", str(tmp_path / name),
                "--corpus", str(corpus), "--domains", "math,agent", "--num-prompts", "2",
                "--max-tokens", "6", "--seed", "3", "--quiet"]  # fmt: skip
        assert bebop(argv) == 0
        outs.append(read_dataset(tmp_path / name))
    a, b = outs
    assert a.meta.domains == ["math", "agent"] and len(a) == 4
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(text_model))
    prompt = tok.decode(a.sequence(0)[0][~a.sequence(0)[1]])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")


def test_train_writes_head_curve_and_resumes(text_model, dataset, tmp_path, capsys):
    """train: head + PNG curve; an existing checkpoint needs --resume (else exit 1 and a
    one-line message); --resume continues the same run to the new step count."""
    data, _ = dataset
    run = tmp_path / "run"
    base = ["mtp", "train", "--model", str(text_model), "--data", str(data), "--out", str(run),
            "--gamma", "2", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-3",
            "--warmup", "1", "--log-every", "1"]  # fmt: skip
    assert bebop([*base, "--steps", "2"]) == 0
    assert (run / "training_curve.png").stat().st_size > 0
    assert (run / "head" / "model.safetensors").is_file()
    capsys.readouterr()
    assert bebop([*base, "--steps", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and len(err.splitlines()) == 1
    assert bebop([*base, "--steps", "3", "--resume"]) == 0
    assert [r["step"] for r in read_log(run / "train_log.jsonl")] == [1, 2, 3]


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert bebop(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_exit_1(text_model, dataset, tmp_path, capsys):
    """γ < 1, missing / empty / corrupt data, a head or tokenizer that does not fit the target:
    exit code 1 with one line naming the problem."""
    data, _ = dataset
    train = ["mtp", "train", "--model", str(text_model), "--out", str(tmp_path / "r")]
    assert "gamma" in _error(capsys, [*train, "--data", str(data), "--gamma", "0"])
    assert "not a directory" in _error(capsys, [*train, "--data", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    assert "missing data.safetensors" in _error(capsys, [*train, "--data", str(tmp_path / "empty")])
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "data.safetensors").write_bytes(b"\x00garbage")
    (bad / "meta.json").write_text("{}")
    assert "corrupt" in _error(capsys, [*train, "--data", str(bad)])

    small = make_tiny_model(tmp_path / "small", vocab_size=32, hidden_size=48, mtp_layout=None)
    head = make_tiny_model(tmp_path / "other", vocab_size=32, hidden_size=64) / "mtp"
    ev = ["mtp", "eval", "--model", str(small), "--mtp", str(head), "--data", str(data)]
    assert "hidden_size" in _error(capsys, ev)
    exp = ["mtp", "export", "--head", str(head), "--model", str(small), "--layout", "qwen3_next",
           "--out", str(tmp_path / "x")]  # fmt: skip
    assert "hidden_size" in _error(capsys, exp)
    msg = _error(capsys, ["mtp", "data", "--model", str(small), "--tokenizer", str(text_model),
                          "--out", str(tmp_path / "d"), "--domains", "math"])  # fmt: skip
    assert "tokenizer" in msg and "do not match" in msg
    # data made for the 320-token text model does not fit the 32-token model
    msg = _error(capsys, ["mtp", "train", "--model", str(small), "--data", str(data),
                          "--out", str(tmp_path / "r2")])  # fmt: skip
    assert "vocabulary" in msg
    assert bebop(["mtp", "nope"]) == 2
