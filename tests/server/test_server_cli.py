"""`bebop serve` as a process: defaults, refusal to expose open admin routes, and a graceful
exit on SIGTERM (lifespan shutdown ran, engine stopped)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bebop_spec.server.cli import add_serve_args, build_configs
from bebop_spec.server.testing import free_port
from bebop_spec.testing import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
SERVE = "import sys; from bebop_spec.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def test_defaults(monkeypatch):
    """Issue defaults: loopback, port 30000, embedded backend, RS drafting; token from env."""
    monkeypatch.setenv("BEBOP_ADMIN_TOKEN", "from-env")
    a = parse("--model", "/m")
    assert (a.host, a.port, a.backend, a.draft_mode, a.admin_token) == (
        "127.0.0.1",
        30000,
        "embedded",
        "rs",
        "from-env",
    )
    engine, server = build_configs(
        parse("--model", "/m/x", "--draft-mode", "none", "--max-num-seqs", "4")
    )
    assert (
        engine.draft_mode is None and engine.max_num_seqs == 4 and server.served_model_name == "x"
    )


def test_refuses_open_admin_on_public_host(tmp_path):
    """No token + 0.0.0.0 exits with status 2 before loading anything."""
    proc = subprocess.run([sys.executable, "-c", SERVE, "--model", str(tmp_path), "--host", "0.0.0.0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "admin token" in proc.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli") / "m", vocab_size=64, seed=4)


def test_sigterm_shuts_down_gracefully(model_dir):
    """The served process answers, then on SIGTERM drains and stops the engine before exiting."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "--model", str(model_dir), "--mtp", str(model_dir / "mtp"),
                             "--port", str(port), "--log-level", "info"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(
            f"{url}/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        )
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn drains, runs the lifespan shutdown, then re-raises the signal (status -15)
    assert proc.returncode in (0, -signal.SIGTERM), out[-2000:]
    assert "engine stopped" in out and "Application shutdown complete" in out
