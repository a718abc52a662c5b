"""clients/examples/grpo.py end to end: the trainer is a separate process (as in real RL), the
server is real (a subprocess the example starts, or one served here for --server), weights
travel over a real gloo group. Tiny random model with a tokenizer; the reward is the demo
math task's (always 0 on a random model, so an entropy bonus makes the weights move)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GRPO = REPO / "clients" / "examples" / "grpo.py"
FIELDS = {
    "step": int, "policy_version": int, "weight_version": str, "reward": float,
    "policy_entropy": float, "acceptance": float, "mean_accepted_length": float,
    "rollout_s": float, "train_s": float, "push_s": float, "step_s": float,
    "max_staleness": int, "dropped_stale": int, "token_versions": dict,
    "entropy_buckets": list, "samples": int, "completion_tokens": int,
}  # fmt: skip
SMALL = ["--prompts-per-step", "2", "--group-size", "2", "--max-tokens", "6",
         "--entropy-coef", "0.05", "--lr", "1e-3", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from bebop_spec.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("rl") / "m", with_tokenizer=True, seed=3)


@pytest.fixture(scope="module")
def served(tiny):
    """A real server in this process, serving `tiny` with its random head (rs, fixed γ: the
    auto policy would rightly stop drafting with a random head, and the steps report
    acceptance)."""
    from bebop_spec.server.testing import serve_model

    with serve_model(str(tiny), str(tiny / "mtp"), engine={"spec_policy": "fixed"}) as (srv, _):
        yield srv.url


def run_grpo(*args: str, timeout: float = 80) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRPO), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def read_steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def assert_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("grpo: error: ")]
    assert len(errors) == 1, proc.stderr
    assert all(n in errors[0] for n in needles), errors[0]


def test_async_steps_over_gloo_with_a_server_subprocess(tiny, tmp_path):
    """Two async steps: the example starts its own server subprocess, forms the gloo group,
    and after each step the server reports the next integer version (1, then 2); every
    token's version label is one that was served, staleness stays within the bound of 1,
    and each steps.jsonl line is strict JSON with every logged field well typed."""
    out = tmp_path / "run"
    proc = run_grpo("--model", str(tiny), "--mtp", str(tiny / "mtp"), "--steps", "2",
                    "--spec-policy", "fixed", "--out", str(out), *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = read_steps(out)
    assert [s["step"] for s in steps] == [0, 1]
    assert [s["weight_version"] for s in steps] == ["1", "2"]  # advances by one per step
    assert [s["policy_version"] for s in steps] == [0, 1]
    for s in steps:
        for name, kind in FIELDS.items():
            assert isinstance(s[name], kind) or (kind is float and isinstance(s[name], int)), name
        assert 0 <= s["reward"] <= 1 and 0 <= s["acceptance"] <= 1
        assert 1 <= s["mean_accepted_length"] <= 4 and s["policy_entropy"] > 0
        assert s["max_staleness"] <= 1 and s["dropped_stale"] == 0
        assert set(s["token_versions"]) <= {"0", "1"}
        assert sum(s["token_versions"].values()) == s["completion_tokens"] > 0
        assert s["step_s"] >= s["train_s"] > 0 and s["push_s"] > 0
    assert steps[0]["max_logprob_drift_fresh"] < 1e-4  # trainer copy == served weights
    assert (out / "grpo.png").stat().st_size > 0 and (out / "server.log").exists()
    assert json.loads((out / "config.json").read_text())["push"] == "distributed"


def test_sync_steps_against_a_running_server_serve_the_pushed_weights(tiny, served, tmp_path):
    """--server URL, sync mode: step 1's tokens are all sampled by the weights pushed over
    gloo after step 0, and the trainer's log-probs of them equal the server's within 1e-4 —
    the push delivered exactly the trainer's (changed) weights."""
    out = tmp_path / "run"
    proc = run_grpo("--server", served, "--model", str(tiny), "--mtp", str(tiny / "mtp"),
                    "--steps", "2", "--sync", "--no-plot", "--out", str(out), *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = read_steps(out)
    base = steps[0]["policy_version"]
    assert [int(s["weight_version"]) for s in steps] == [base + 1, base + 2]
    assert steps[1]["token_versions"] == {str(base + 1): steps[1]["completion_tokens"]}
    assert steps[1]["max_logprob_drift_fresh"] < 1e-4
    assert steps[0]["grad_norm"] > 0  # the entropy bonus moved the weights


def test_mismatched_model_fails_before_training(tiny, served, tmp_path):
    """A trainer model whose tensors the server does not have (3 layers against 2) is refused
    at the initial sync: exit code 1 and one line naming the unknown parameter."""
    from bebop_spec.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other", with_tokenizer=True, num_layers=3, seed=4)
    proc = run_grpo("--server", served, "--model", str(other), "--draft-mode", "none",
                    "--steps", "1", "--out", str(tmp_path / "run"), *SMALL)  # fmt: skip
    assert_error_line(proc, "model.layers.2")


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--server", "http://127.0.0.1:9"], ["no healthy Bebop server", "127.0.0.1:9"]),
        (["--draft-mode", "none", "--online-head", "ce"], ["--online-head"]),
    ],
    ids=["unreachable", "bad-options"],
)
def test_bad_input_ends_in_one_line(tiny, tmp_path, extra, needles):
    """An unreachable --server or contradictory options: exit 1, one `grpo: error:` line,
    no traceback."""
    proc = run_grpo("--model", str(tiny), "--mtp", str(tiny / "mtp"), "--out",
                    str(tmp_path / "run"), *extra)  # fmt: skip
    assert_error_line(proc, *needles)
