"""bebop_client.consistency (issue 15): the trainer recomputes the logprobs the server
reported and the report measures the gap.

- The pure report: known Δ in, known max / mean / ratio quantiles / flags out.
- The recompute offset: completion token j is scored by the logits at prompt_len + j − 1.
- End to end against the project's own server (tiny random Qwen3 with tokenizer, fp32 CPU),
  draft modes none and rs: the HF model loaded from the same directory at the same
  temperature reproduces `output_token_logprobs` within 1e-4 (max |Δ| over every token),
  so the server's logprobs are softmax(logits / T) of the target, speculation or not; a
  differently seeded model, or the right model at the wrong temperature, shows a large gap.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
try:
    import bebop_client  # noqa: F401  (installed with `pip install ./clients`)
except ImportError:
    sys.path.insert(0, str(REPO / "clients"))

from bebop_client import RolloutClient  # noqa: E402
from bebop_client.consistency import (  # noqa: E402
    check_rollouts,
    logprob_mismatch,
    recompute_logprobs,
    run,
)

TEMPERATURE = 0.8
PROMPTS = [[5, 9, 2, 7], [11, 3]]


def test_report_on_known_deltas():
    """Ratios exp(Δ) = 1 + k/100, k = 0..100, split 50 / 51 over two rollouts: with N = 101
    numpy's linear quantile q sits exactly on k = 100q, so p1..p99 are 1.01 .. 1.99; max |Δ|
    = log 2; tokens with Δ > 0.5 are k ≥ 65 (1 + k/100 > e^0.5 ≈ 1.6487), 36 of them."""
    k = np.arange(101)
    delta = np.log1p(k / 100)
    server = -np.linspace(0.1, 5.0, 101)  # any values: only the difference counts
    trainer = server + delta
    r = logprob_mismatch([trainer[:50], trainer[50:]], [server[:50], server[50:]], threshold=0.5)
    assert r.overall.num_tokens == 101
    assert r.overall.max_abs_diff == pytest.approx(math.log(2))
    assert r.overall.mean_abs_diff == pytest.approx(delta.mean())
    want = {"p1": 1.01, "p5": 1.05, "p50": 1.5, "p95": 1.95, "p99": 1.99}
    assert r.overall.ratio_quantiles == pytest.approx(want)
    assert r.overall.num_flagged == 36 and len(r.flagged) == 36
    assert r.overall.log_ratio_sum == pytest.approx(delta.sum())
    # per rollout: the first holds k < 50 (nothing flagged), the second k = 50..100
    a, b = r.rollouts
    assert (a.num_tokens, b.num_tokens) == (50, 51)
    assert a.max_abs_diff == pytest.approx(math.log(1.49)) and a.num_flagged == 0
    assert b.ratio_quantiles["p50"] == pytest.approx(1.75)  # median of 1.50 .. 2.00
    first = r.flagged[0]
    assert (first.rollout, first.position) == (1, 15)  # k = 65 is index 15 of rollout 1
    assert first.diff == pytest.approx(math.log(1.65))
    # JSON: strict (no NaN), and an empty rollout reads null
    e = logprob_mismatch([[], [0.0]], [[], [-0.5]])
    d = json.loads(e.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert d["rollouts"][0]["max_abs_diff"] is None and d["overall"]["max_abs_diff"] == 0.5
    assert "all" in e.table()
    with pytest.raises(ValueError):
        logprob_mismatch([[0.0, 1.0]], [[0.0]])


def test_recompute_uses_the_preceding_position():
    """A bigram 'model' (logits[t] depend only on ids[t]) gives completion token j the
    log softmax(table[previous token] / T)[token]: the offset is prompt_len + j − 1, and
    right padding in a mixed-length batch changes nothing."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(16, 16, generator=g) * 2  # [V, V]: row = previous token

    def bigram(ids):  # ids[B, L] -> logits[B, L, V]
        return table[ids]

    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]]
    got = recompute_logprobs(bigram, prompts, comps, temperature=0.5, batch_size=2)
    for p, c, lps in zip(prompts, comps, got, strict=True):
        prev = [p[-1]] + c[:-1]
        want = [
            torch.log_softmax(table[a] / 0.5, -1)[b].item() for a, b in zip(prev, c, strict=True)
        ]
        assert lps == pytest.approx(want, abs=1e-6)
    alone = recompute_logprobs(bigram, prompts[1:], comps[1:], temperature=0.5)
    assert alone[0] == pytest.approx(got[1], abs=1e-6)


@pytest.fixture(scope="module")
def hf_models(tiny_text_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from bebop_spec.testing import make_tiny_model

    other = make_tiny_model(tmp_path_factory.mktemp("other") / "m", with_tokenizer=True, seed=4,
                            mtp_layout=None)  # fmt: skip
    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731
    return load(tiny_text_model), load(other)


@pytest.mark.parametrize("draft_mode", [None, "rs"])
def test_server_logprobs_match_hf_model(tiny_text_model, hf_models, draft_mode):
    """Same weights, same T: max |Δ| < 1e-4 over every token; wrong weights: max |Δ| > 1 and
    tokens flagged; wrong temperature (1.0 for 0.8): mean |Δ| > 0.01."""
    from bebop_spec.server.testing import serve_model

    same, other = hf_models
    engine = {"draft_mode": draft_mode, "max_model_len": 128, "spec_policy": "fixed"}
    sp = {"temperature": TEMPERATURE, "max_new_tokens": 16, "ignore_eos": True,
          "sampling_seed": 7}  # fmt: skip
    mtp = str(tiny_text_model / "mtp") if draft_mode else None  # the dir's random head
    with (
        serve_model(str(tiny_text_model), mtp, engine=engine) as (srv, _),
        RolloutClient(srv.url) as c,
    ):
        report = check_rollouts(c, same, PROMPTS, sampling_params=sp, n=2)
        samples = c.generate_batch(PROMPTS, sp, n=2)
        if draft_mode == "rs":
            assert all(s.spec_verify_ct > 0 for g in samples for s in g)
    assert report.overall.num_tokens == 4 * 16
    print(f"\n[{draft_mode}] same model:\n{report.table()}")
    assert report.overall.max_abs_diff < 1e-4 and not report.flagged
    assert report.overall.ratio_quantiles["p1"] > 0.9999

    bad = check_rollouts(samples, other, temperature=TEMPERATURE)  # Sample groups directly
    print(f"[{draft_mode}] other seed:\n{bad.table()}")
    assert bad.overall.max_abs_diff > 1.0 and bad.overall.num_flagged > 0
    hot = check_rollouts(samples, same, temperature=1.0)
    print(f"[{draft_mode}] T=1.0 for 0.8:\n{hot.table()}")
    assert hot.overall.mean_abs_diff > 0.01


def test_cli(tiny_text_model, tmp_path, capsys):
    """The CLI samples through the client, prints the table and writes the JSON report;
    prompts may be text (the model dir's tokenizer) or JSON token ids."""
    from bebop_spec.server.testing import serve_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n[5, 9, 2]\n")
    out = tmp_path / "r.json"
    with serve_model(str(tiny_text_model), engine={"draft_mode": None}) as (srv, _):
        report = run(["--url", srv.url, "--model", str(tiny_text_model), "--prompts",
                       str(prompts), "--prompts", "Hi", "--n", "2", "--max-new-tokens", "8",
                       "--temperature", "1.0", "--json", str(out)])  # fmt: skip
    assert len(report.rollouts) == 3 * 2
    assert report.overall.max_abs_diff < 1e-4
    assert json.loads(out.read_text())["overall"]["num_tokens"] == report.overall.num_tokens
    assert "all" in capsys.readouterr().out
