"""`bebop mtp eval | export` and the demo-head hook (bebop_spec.train.evaluate / export).

Tiny random Qwen3 targets made locally; heads are random (init_mtp_head) or trained a few steps.

Run: python -m pytest -q tests/train/test_mtp_eval.py
"""

from __future__ import annotations

import json

import pytest
import torch

from bebop_spec import LLM, SamplingParams
from bebop_spec.cli import main as bebop
from bebop_spec.models import init_mtp_head, load_config, save_mtp_head
from bebop_spec.testing import make_tiny_model
from bebop_spec.train.data import DistillSample, write_dataset
from bebop_spec.train.evaluate import chain_acceptance
from bebop_spec.train.losses import chain_alpha

VOCAB = 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random Qwen3 (vocab 48, hidden 32) with a random qwen3_next head in model/mtp."""
    root = tmp_path_factory.mktemp("mtpeval")
    return make_tiny_model(root / "m", vocab_size=VOCAB, hidden_size=32, seed=2)


@pytest.fixture(scope="module")
def heldout(model, tmp_path_factory):
    """Held-out data sampled from the target at T = 1 by the engine: 2 domains x 6 prompts."""
    llm = LLM(str(model), draft_mode=None)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB - 1, (4,), generator=gen).tolist() for _ in range(12)]
    params = [SamplingParams(temperature=1.0, max_tokens=40, seed=i, ignore_eos=True)
              for i in range(12)]  # fmt: skip
    outs = llm.generate(prompts, params)
    samples = [
        DistillSample(
            p + o.outputs[0].token_ids,
            [0] * 4 + [1] * len(o.outputs[0].token_ids),
            "a" if i % 2 else "b",
        )  # fmt: skip
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
    ]
    out = tmp_path_factory.mktemp("held") / "data"
    write_dataset(out, samples, model=str(model), temperature=1.0)
    return out


def test_chain_acceptance_formulas():
    """α_rs = Σ min(p, q) and α_to = p(argmax q) with p, q = softmax(logits / T); at T = 1 the
    rs value equals the trainer's soft acceptance (losses.chain_alpha)."""
    gen = torch.Generator().manual_seed(0)
    z, w = (torch.randn(5, 3, 11, generator=gen) * 2 for _ in range(2))
    for t in (0.6, 1.0):
        p, q = (w / t).softmax(-1), (z / t).softmax(-1)
        acc = chain_acceptance(z, w, t)
        torch.testing.assert_close(acc["rs"], torch.minimum(p, q).sum(-1))
        torch.testing.assert_close(acc["to"], p.gather(-1, q.argmax(-1, keepdim=True))[..., 0])
        torch.testing.assert_close(acc["entropy"], -(p * p.log()).sum(-1))
    torch.testing.assert_close(chain_acceptance(z, w, 1.0)["rs"], chain_alpha(z, w))


def test_eval_cli_json_table_plot(model, heldout, tmp_path, capsys):
    """eval writes eval.json (a row per domain x mode x T x source, with per_pos = cumulative
    products of alpha and E[A] = Σ per_pos), the plot and a table. The measured first-position
    acceptance agrees with the analytic one on the same model (T = 1, same data distribution):
    ~600 drafts per mode, |difference| < 0.12 (about 4 standard errors plus the
    teacher-forcing approximation)."""
    out = tmp_path / "eval"
    argv = ["mtp", "eval", "--model", str(model), "--mtp", str(model / "mtp"), "--data",
            str(heldout), "--out", str(out), "--temperatures", "0.6", "1.0", "--max-tokens",
            "48", "--measure-prompts", "6", "--quiet"]  # fmt: skip
    assert bebop(argv) == 0
    table = capsys.readouterr().out
    assert "analytic" in table and "measured" in table
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 * 2
    assert (out / "acceptance_per_pos.png").stat().st_size > 0
    for r in rows:
        assert len(r["per_pos"]) == 3 and r["count"] > 0
        assert r["per_pos"] == sorted(r["per_pos"], reverse=True)
        assert r["accepted_length"] == pytest.approx(sum(r["per_pos"]), abs=1e-9)
        prod = 1.0
        for a, pp in zip(r["alpha"], r["per_pos"], strict=True):
            prod *= a
            assert prod == pytest.approx(pp, abs=1e-9)
    by = {(r["domain"], r["mode"], r["temperature"], r["source"]): r for r in rows}
    for mode in ("rs", "to"):
        an = sum(by[d, mode, 1.0, "analytic"]["per_pos"][0] for d in "ab") / 2
        me = sum(by[d, mode, 1.0, "measured"]["per_pos"][0] for d in "ab") / 2
        assert abs(an - me) < 0.12, (mode, an, me)


def test_chain_acceptance_over_a_draft_vocabulary():
    """With tokens outside the draft vocabulary masked, q is the head's softmax renormalised
    over the K tokens (0 elsewhere) while p keeps the full vocabulary: α_rs = Σ_K min(p, q_K)."""
    gen = torch.Generator().manual_seed(3)
    z, w = (torch.randn(4, 3, 11, generator=gen) * 2 for _ in range(2))
    outside = torch.ones(11, dtype=torch.bool)
    outside[[0, 3, 4, 9]] = False
    for t in (0.6, 1.0):
        p = (w / t).softmax(-1)
        q = (z / t).masked_fill(outside, float("-inf")).softmax(-1)
        acc = chain_acceptance(z, w, t, outside_draft_vocab=outside)
        torch.testing.assert_close(acc["rs"], torch.minimum(p, q).sum(-1))
        torch.testing.assert_close(acc["to"], p.gather(-1, q.argmax(-1, keepdim=True))[..., 0])


def test_eval_serves_the_heads_draft_vocabulary(model, heldout, tmp_path):
    """A head that ships a draft vocabulary (its 12 most frequent of 48 tokens as default) is
    evaluated as the engine serves it: the analytic first-position rs acceptance agrees with
    the engine's measured one (~600 drafts, |difference| < 0.12 as in the test above) and
    differs from the full-vocabulary analytic value (`--draft-vocab-size 0`) by > 0.05."""
    import shutil

    from bebop_spec.models.mtp_io import save_draft_vocab

    head = tmp_path / "head"
    shutil.copytree(model / "mtp", head)
    save_draft_vocab(head, list(range(VOCAB)), default_size=12)

    def first(extra: list[str], source: str) -> float:
        out = tmp_path / f"eval{len(extra)}{source}"
        argv = ["mtp", "eval", "--model", str(model), "--mtp", str(head), "--data",
                str(heldout), "--out", str(out), "--temperatures", "1.0", "--modes", "rs",
                "--max-tokens", "48", "--measure-prompts", "6", "--quiet", *extra]  # fmt: skip
        assert bebop(argv) == 0
        rows = json.loads((out / "eval.json").read_text())["rows"]
        return sum(r["per_pos"][0] for r in rows if r["source"] == source) / 2

    served, measured = first([], "analytic"), first(["--no-analytic"], "measured")
    full = first(["--draft-vocab-size", "0", "--no-measured"], "analytic")
    assert abs(served - measured) < 0.12, (served, measured)
    assert abs(served - full) > 0.05, (served, full)


def _outputs(model, mtp, seed: int | None, temperature: float):
    llm = LLM(
        str(model),
        mtp=None if mtp is None else str(mtp),
        num_speculative_tokens=3,
        spec_policy="fixed",
    )  # acceptance counts compared: the same γ every step
    prompts = [[1, 2, 3], [7, 5, 9, 11, 2]]
    sp = SamplingParams(temperature=temperature, max_tokens=24, seed=seed, ignore_eos=True)
    outs = llm.generate(prompts, sp)
    return [o.outputs[0].token_ids for o in outs], llm.spec_stats.accepted_per_pos


@pytest.mark.parametrize("layout", ["qwen3_next", "deepseek_v3"])
def test_export_round_trip_identical(model, tmp_path, layout):
    """A head exported in its own layout (separate dir, bf16-free) and mixed into a copy of the
    target loads back in the engine with identical greedy and seeded-sampling outputs and
    identical per-position acceptance counts."""
    cfg = load_config(model)
    head = init_mtp_head(cfg, layout, seed=7)
    with torch.no_grad():  # a head that actually drafts something: copy of the target's scale
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    src = save_mtp_head(head, tmp_path / "src", layout, cfg)
    exported = tmp_path / "exp"
    argv = ["mtp", "export", "--head", str(src), "--model", str(model), "--layout", layout,
            "--out", str(exported)]  # fmt: skip
    assert bebop(argv) == 0
    into = tmp_path / "into"
    assert bebop([*argv[:-2], "--out", str(into), "--into-target"]) == 0
    hf = json.loads((exported / "config.json").read_text())
    key = "mtp_num_hidden_layers" if layout == "qwen3_next" else "num_nextn_predict_layers"
    assert hf[key] == 1 and hf["bebop_mtp"]["layout"] == layout
    for temperature, seed in ((0.0, None), (1.0, 123)):
        ref = _outputs(model, src, seed, temperature)
        assert _outputs(model, exported, seed, temperature) == ref
        assert _outputs(into, None, seed, temperature) == ref


def test_export_layout_change_needs_convert(model, tmp_path, capsys):
    """qwen3_next -> deepseek_v3 is refused without --convert (one line, exit 1); converted,
    the head drafts differently only through position 0, and greedy output is unchanged (it is
    the target's argmax whatever the head)."""
    argv = ["mtp", "export", "--head", str(model / "mtp"), "--model", str(model), "--layout",
            "deepseek_v3", "--out", str(tmp_path / "ds")]  # fmt: skip
    assert bebop(argv) == 1
    assert "--convert" in capsys.readouterr().err
    assert bebop([*argv, "--convert"]) == 0
    greedy = _outputs(model, model / "mtp", None, 0.0)[0]
    assert _outputs(model, tmp_path / "ds", None, 0.0)[0] == greedy


def test_train_demo_head_hook(tmp_path):
    """train_demo_head(target_dir, out_dir) self-distils from the sibling corpus, trains and
    leaves a loadable head in out_dir; demo_head_stage returns a JSON-able summary."""
    from bebop_spec.demo.corpus import Example
    from bebop_spec.train import demo_head_stage, train_demo_head

    root = tmp_path / "demo"
    target = make_tiny_model(root / "target", hidden_size=32, with_tokenizer=True,
                             mtp_layout=None, seed=4)  # fmt: skip
    (root / "corpus").mkdir()
    for domain in ("math", "code", "agent"):
        ex = Example(domain, [{"role": "user", "content": f"a {domain} question"},
                              {"role": "assistant", "content": "an answer"}])  # fmt: skip
        (root / "corpus" / f"{domain}.train.jsonl").write_text(ex.to_json() + "\n")
    then = [{"loss": "nla", "steps": 3, "lr": 1e-3, "seed": 5}]
    out = train_demo_head(target, tmp_path / "head", steps=2, warm_steps=1, num_prompts=1,
                          max_tokens=12, progress=False, then=then)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["data"]["sequences"] == 3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["run"]) for r in log][-1] == (5, 1)  # the restart's steps follow on
    assert [r["step"] for r in log] == sorted(r["step"] for r in log)
    assert summary["warm_start"] == {"loss": "fkl", "steps": 1}
    assert (out / "training_curve.png").is_file() and (out / "warm_log.jsonl").is_file()
    assert not any((out / d).exists() for d in ("run0", "run1", "warm", "hiddens"))
    llm = LLM(str(target), mtp=str(out), num_speculative_tokens=3)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, seed=0))[0].outputs[0].token_ids
    assert isinstance(demo_head_stage.cache_key, str)
