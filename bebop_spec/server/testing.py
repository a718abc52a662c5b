"""Run a real server in-process for tests, examples and benchmarks.

with ServerThread(build_app(engine, ServerConfig(port=0))) as srv:
    httpx.get(f"{srv.url}/health")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn on its own thread and event loop; `url` once started. Stops on exit."""

    def __init__(
        self, app, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 60.0
    ):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5, ws="none", timeout_keep_alive=75)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def serve_model(model: str, mtp: str | None = None, *, engine: dict | None = None,
                server: dict | None = None) -> Iterator[tuple[ServerThread, Any]]:  # fmt: skip
    """Load `model` into the embedded engine and serve it on a free loopback port.
    Yields (server thread, ServerState)."""
    from bebop_spec.backends.embedded import EmbeddedBackend
    from bebop_spec.engine.config import EngineConfig
    from bebop_spec.server.app import build_app
    from bebop_spec.server.config import ServerConfig

    ecfg = EngineConfig(model=str(model), mtp=None if mtp is None else str(mtp), **(engine or {}))
    scfg = ServerConfig(**{"served_model_name": "tiny", **(server or {})})
    app = build_app(EmbeddedBackend(ecfg), scfg)
    with ServerThread(app) as srv:
        yield srv, app.state.bebop
