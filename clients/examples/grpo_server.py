"""Start a Bebop rollout server as a subprocess on a free loopback port (or check a given one).

    with launch_server(model, mtp=head, draft_mode="rs", log_path=out / "server.log") as url:
        ...                                   # `python -m bebop_spec.cli serve ...` on url

The server is a separate process (its own interpreter and torch threads), as it would be
next to a real trainer; it is stopped (SIGTERM, then SIGKILL) when the block exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server subprocess exited or did not answer /health in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(model: str, port: int, mtp: str | None, draft_mode: str, gamma: int,
                  max_num_seqs: int, seed: int, spec_policy: str = "auto") -> list[str]:  # fmt: skip
    cmd = [sys.executable, "-m", "bebop_spec.cli", "serve", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--draft-mode", draft_mode,
           "--num-speculative-tokens", str(gamma), "--max-num-seqs", str(max_num_seqs),
           "--spec-policy", spec_policy, "--seed", str(seed), "--log-level", "warning"]  # fmt: skip
    return cmd + (["--mtp", mtp] if mtp and draft_mode != "none" else [])


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def wait_healthy(url: str, proc: subprocess.Popen | None, log_path: Path | None,
                 timeout_s: float) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            why = _last_line(log_path) if log_path else ""
            raise ServerStartError(f"server exited with code {proc.returncode}: {why}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.25)
    raise ServerStartError(f"server at {url} did not become healthy within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def launch_server(model: str, *, mtp: str | None, draft_mode: str, log_path: Path,
                  gamma: int = 3, max_num_seqs: int = 64, seed: int = 0,
                  spec_policy: str = "auto", timeout_s: float = 300.0) -> Iterator[str]:  # fmt: skip
    """Yield the URL of a fresh server subprocess; its output goes to `log_path`."""
    port = free_port()
    cmd = serve_command(model, port, mtp, draft_mode, gamma, max_num_seqs, seed, spec_policy)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, log_path, timeout_s)
            yield url
        finally:
            _stop(proc)
