"""Push trainer weights to every rollout server, by disk, HTTP body or torch.distributed.

    sync = WeightSync(client)                                   # a RolloutClient or URLs
    v = sync.push_tensor(model.state_dict(), weight_version="12")           # HTTP body
    v = sync.push_disk(state_dict, "/shared/ckpt", weight_version="13")     # shared disk
    sync.init_group("10.0.0.5", 29600, backend="nccl")                      # once
    v = sync.push_distributed(state_dict, weight_version="14")              # broadcast

Every push pauses generation (`pause_mode`, default "in_place": requests keep their tokens
and continue on the new weights) and always resumes it. Integer versions are checked
first: pushing one older than a server already serves raises VersionConflict before
anything is sent. A server that refuses an update (unknown names, bad shapes) raises
WeightSyncError with its message; it keeps its old weights.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bebop_client import distributed as D
from bebop_client.async_client import AsyncRolloutClient
from bebop_client.client import RolloutClient
from bebop_client.errors import (
    AuthenticationError,
    BebopClientError,
    RequestRejected,
    VersionConflict,
    WeightSyncError,
)
from bebop_client.process_group import init_custom_process_group, tcp_init_method
from bebop_client.tensors import (
    StateDict,
    buckets,
    by_dtype,
    check_state_dict,
    dtype_name,
    save_checkpoint,
    shape_of,
    to_safetensors_bytes,
)
from bebop_client.vocab import PAUSE_MODES as SERVER_PAUSE_MODES
from bebop_client.vocab import SELECTORS, PauseMode, WeightSelector

PAUSE_MODES = (None, *SERVER_PAUSE_MODES)  # None: push without pausing
GB = 1024**3
GRACE_S = 5.0  # how long broadcasts may lag a server's refusal before the group is declared broken


def _as_int(label: Any) -> int | None:
    try:
        return int(str(label))
    except ValueError:
        return None


def check_version(pushed: str | None, serving: dict[str, str]) -> None:
    """VersionConflict when `pushed` and a server's label are integers and pushed < label."""
    p = None if pushed is None else _as_int(pushed)
    if p is None:
        return
    newer = {u: v for u, v in serving.items() if (s := _as_int(v)) is not None and p < s}
    if newer:
        raise VersionConflict(
            f"weight_version {pushed} is older than what is served: {newer}; nothing was sent",
            str(pushed),
            newer,
        )


class _Group:
    """The trainer's end of a weight-update group."""

    def __init__(self, pg: Any, name: str, backend: str) -> None:
        self.pg, self.name, self.backend = pg, name, backend
        self.device = "cuda" if backend == "nccl" else "cpu"
        self.broken = False


class WeightSync:
    def __init__(self, client: RolloutClient | AsyncRolloutClient | str | Sequence[str], *,
                 api_key: str | None = None, selector: str = WeightSelector.ALL,
                 pause_mode: str | None = PauseMode.IN_PLACE, flush_cache: bool = True,
                 timeout: float = 1800.0) -> None:  # fmt: skip
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}")
        if isinstance(client, RolloutClient):
            self.client, self._owned = client, False
        else:  # an async client or URLs: weight pushes are blocking calls on their own client
            urls = client.urls if isinstance(client, AsyncRolloutClient) else client
            key = client.api_key if isinstance(client, AsyncRolloutClient) else api_key
            self.client, self._owned = RolloutClient(urls, api_key=key, timeout=timeout), True
        self.selector, self.pause_mode, self.flush_cache = selector, pause_mode, flush_cache
        self.timeout = timeout
        self.group: _Group | None = None
        self.versions: dict[str, str] = {}  # label each server reported after the last push

    def close(self) -> None:
        if self.group is not None:
            self.destroy_group()
        if self._owned:
            self.client.close()

    def __enter__(self) -> WeightSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- shared
    def _prepare(self, tensors: StateDict, weight_version: Any, selector: str | None):
        check_state_dict(tensors)
        selector = selector or self.selector
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}")
        version = None if weight_version is None else str(weight_version)
        check_version(version, self.client.weight_versions())
        return version, selector

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        if self.pause_mode is None:
            yield
            return
        self.client.pause(self.pause_mode)
        try:
            yield
        finally:
            self.client.resume()

    def _post_all(self, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        """POST to each server; WeightSyncError (naming who applied it) if any refused."""
        replies: dict[str, Any] = {}
        for url in self.client.urls:
            replies[url] = self._post(url, path, body, applied=dict(replies), **kw)
        return replies

    def _post(self, url: str, path: str, body: Any, applied: dict | None = None, **kw: Any) -> Any:
        try:
            reply = self.client.post(path, body, url=url, timeout=self.timeout, **kw)
        except AuthenticationError:
            raise
        except RequestRejected as exc:
            raise WeightSyncError(exc.status, exc.message, url=url, param=exc.param, code=exc.code,
                                  body=exc.body, applied=applied) from exc  # fmt: skip
        if isinstance(reply, dict) and reply.get("success") is False:  # SGLang style 200
            raise WeightSyncError(
                200, str(reply.get("message")), url=url, body=reply, applied=applied
            )
        return reply

    def _done(self, replies: dict[str, Any]) -> str:
        self.versions = {u: str((r or {}).get("weight_version")) for u, r in replies.items()}
        if any(v == "None" for v in self.versions.values()):  # a server without the label
            self.versions = self.client.weight_versions()
        return self.versions[self.client.urls[0]]

    # --------------------------------------------------------------- disk
    def push_disk(self, tensors: StateDict, directory: str | Path, *, weight_version: Any = None,
                  selector: str | None = None, keep: bool = False,
                  shard_bytes: int = 5 * GB) -> str:  # fmt: skip
        """Write safetensors under `directory` (which every server must see at the same
        path), then /update_weights_from_disk on each server. Returns the new version."""
        version, selector = self._prepare(tensors, weight_version, selector)
        out = Path(directory) / f"bebop-weights-{version or 'next'}-{uuid.uuid4().hex[:8]}"
        save_checkpoint(tensors, out, shard_bytes)
        body = {"model_path": str(out.resolve()), "weight_version": version,
                "selector": selector, "flush_cache": self.flush_cache}  # fmt: skip
        try:
            with self._paused():
                return self._done(self._post_all("/update_weights_from_disk", body))
        finally:
            if not keep:
                shutil.rmtree(out, ignore_errors=True)

    # --------------------------------------------------------------- HTTP
    def push_tensor(self, tensors: StateDict, *, weight_version: Any = None,
                    selector: str | None = None, bucket_bytes: int = 2 * GB) -> str:  # fmt: skip
        """POST safetensors bytes to /update_weights_from_tensor (Bebop's octet-stream form,
        options in the query string), one request per bucket. Returns the new version."""
        version, selector = self._prepare(tensors, weight_version, selector)
        parts = list(buckets(tensors, bucket_bytes))
        replies: dict[str, Any] = {}
        with self._paused():
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                params = {
                    "selector": selector,
                    "flush_cache": str(self.flush_cache and last).lower(),
                }
                if version is not None:
                    params["weight_version"] = version
                replies = self._post_all(
                    "/update_weights_from_tensor", None, content=to_safetensors_bytes(part),
                    params=params, headers={"content-type": "application/octet-stream"},
                )  # fmt: skip
        return self._done(replies)

    # -------------------------------------------------------- distributed
    def init_group(self, master_address: str, master_port: int, *, backend: str = "nccl",
                   group_name: str = "bebop_weight_sync", ranks_per_server: int = 1,
                   timeout_s: float = 600.0) -> None:  # fmt: skip
        """Form the weight-update group: this process is rank 0 (hosting the TCP store at
        master_address:master_port); server i joins at rank_offset 1 + i·ranks_per_server
        (ranks_per_server = the server's tensor-parallel size for SGLang)."""
        if self.group is not None:
            raise BebopClientError(f"group {self.group.name!r} exists: destroy_group() first")
        urls = self.client.urls
        world = 1 + len(urls) * ranks_per_server
        result: dict[str, Any] = {}

        def host() -> None:
            try:
                result["pg"] = init_custom_process_group(
                    backend, tcp_init_method(master_address, master_port), world, 0,
                    group_name, timeout_s)  # fmt: skip
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=host, name="bebop-group-host", daemon=True)
        thread.start()
        bodies = {u: {"master_address": master_address, "master_port": master_port,
                      "rank_offset": 1 + i * ranks_per_server, "world_size": world,
                      "group_name": group_name, "backend": backend}
                  for i, u in enumerate(urls)}  # fmt: skip
        posts = D.Concurrent(lambda u: self._post(u, "/init_weights_update_group", bodies[u]), urls)
        deadline = time.monotonic() + timeout_s
        while not posts.done() or thread.is_alive():
            if posts.failed_early():  # a server refused: the rendezvous would wait for it
                raise next(iter(posts.errors.values()))
            if "error" in result or time.monotonic() > deadline:
                raise BebopClientError(f"weight-update group rendezvous at {master_address}:"
                                       f"{master_port} failed: {result.get('error', 'timeout')}")  # fmt: skip
            time.sleep(0.01)
        if posts.errors or "pg" not in result:
            raise next(iter(posts.errors.values()), BebopClientError(str(result.get("error"))))
        self.group = _Group(result["pg"], group_name, backend)

    def push_distributed(self, tensors: StateDict, *, weight_version: Any = None,
                         selector: str | None = None, bucket_bytes: int = GB,
                         flattened: bool = False) -> str:  # fmt: skip
        """Per bucket: POST /update_weights_from_distributed {names, dtypes, shapes} to every
        server while broadcasting the bucket's tensors from rank 0 (SGLang's protocol);
        `flattened` sends each bucket as one uint8 buffer (load_format "flattened_bucket")."""
        group = self._live_group()
        version, selector = self._prepare(tensors, weight_version, selector)
        parts = [
            p for b in buckets(tensors, bucket_bytes) for p in (by_dtype(b) if flattened else [b])
        ]
        replies: dict[str, Any] = {}
        with self._paused():
            for i, part in enumerate(parts):
                body = {"names": list(part), "dtypes": [dtype_name(x) for x in part.values()],
                        "shapes": [shape_of(x) for x in part.values()], "group_name": group.name,
                        "weight_version": version, "selector": selector,
                        "flush_cache": self.flush_cache and i == len(parts) - 1,
                        "load_format": "flattened_bucket" if flattened else None}  # fmt: skip
                replies = self._bucket(group, body, part, flattened)
        return self._done(replies)

    def _bucket(self, group: _Group, body: dict, part: StateDict, flattened: bool) -> dict:
        urls = self.client.urls
        posts = D.Concurrent(
            lambda u: self._post(u, "/update_weights_from_distributed", body), urls
        )
        works = D.start_broadcasts(group.pg, [D.to_torch(x, group.device) for x in part.values()],
                                   flattened)  # fmt: skip
        grace: float | None = None
        while not all(w.is_completed() for w in works):
            if posts.failed_early():  # refused; if before receiving, our broadcasts hang
                grace = grace or time.monotonic() + GRACE_S
            if grace is not None and time.monotonic() > grace:
                group.broken = True
                err = next(iter(posts.wait().values()))
                raise WeightSyncError(err.status, f"{err.message} (the weight-update group is now "
                                      "out of step: call destroy_group() and init_group() again)",
                                      url=err.url, body=err.body) from err  # fmt: skip
            time.sleep(0.002)
        for w in works:
            w.wait()
        errors = posts.wait()
        if errors:
            raise next(iter(errors.values()))
        return posts.results

    def _live_group(self) -> _Group:
        if self.group is None:
            raise BebopClientError("no weight-update group: call init_group() first")
        if self.group.broken:
            raise BebopClientError("the weight-update group is out of step: destroy_group() first")
        return self.group

    def destroy_group(self) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        try:
            if not group.broken:
                self._post_all("/destroy_weights_update_group", {"group_name": group.name})
        finally:
            D.destroy(group.pg)

    # ------------------------------------------------------------- facade
    def push(self, tensors: StateDict, method: str = "tensor", **kwargs: Any) -> str:
        """push_disk / push_tensor / push_distributed by name ("disk" | "tensor" | "distributed")."""
        fn = {"disk": self.push_disk, "tensor": self.push_tensor,
              "distributed": self.push_distributed}.get(method)  # fmt: skip
        if fn is None:
            raise ValueError(f"method must be disk, tensor or distributed, got {method!r}")
        return fn(tensors, **kwargs)
