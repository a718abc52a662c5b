"""Server configuration: one validated dataclass, built by `bebop serve` (see bebop_spec/server/cli.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK_HOSTS = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = "bebop"
    admin_token: str | None = None  # weight / control routes (stricter than api_key)
    api_key: str | None = None  # every route but /health* and /metrics (SGLang / vLLM --api-key)
    allow_unauthenticated_admin: bool = False
    # Bounds on what one client may ask for (HTTP 400/413 beyond them).
    max_body_bytes: int = 16 * 1024 * 1024  # JSON request bodies
    max_tensor_body_bytes: int = 8 * 1024**3  # /update_weights_from_tensor bodies
    max_distributed_bytes: int = 64 * 1024**3  # one /update_weights_from_distributed call
    max_n: int = 64  # samples per prompt
    max_batch: int = 1024  # prompts per /generate or /v1/completions call
    max_logprobs: int = 20  # top alternatives per token
    max_stop: int = 32  # stop strings per request
    retry_after_s: int = 1  # Retry-After header of 503 replies
    group_timeout_s: float = 600.0  # rendezvous / broadcast timeout of weight-update groups
    weights_root: str | None = None  # when set, update_weights_from_disk paths must lie under it

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.admin_token == "":
            self.admin_token = None
        if self.api_key == "":
            self.api_key = None
        if self.max_n < 1 or self.max_batch < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_n, max_batch must be >= 1 and max_body_bytes >= 1024")
        open_admin = not self.admin_protected and not self.allow_unauthenticated_admin
        if open_admin and not is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host} without an api key or admin token: pass --api-key"
                " (or BEBOP_API_KEY) and/or --admin-token (or BEBOP_ADMIN_TOKEN), bind "
                "127.0.0.1, or pass --allow-unauthenticated-admin"
            )

    @property
    def admin_protected(self) -> bool:
        """Admin routes need a key: the admin token, or else the API key that guards all."""
        return self.admin_token is not None or self.api_key is not None
