"""Append-only JSONL of finished samples: what lets `bebop mtp data --server` resume.

    with SampleShard(out / "samples.jsonl", header) as shard:   # reads what a past run left
        if (i, j) not in shard.done:
            shard.add(Record(i, j, token_ids, "stop", url))           # one line, flushed

Line 1 holds {"header": ...}, the settings the samples were drawn under; reopening with other
settings is an error (the samples would mix two runs). Every other line is one record, keyed
(prompt, sample) and written with one flushed write, so a killed run leaves at most a partial
last line; opening drops it (and cuts it off the file) and keeps everything before it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    prompt: int  # index among the run's kept prompts
    sample: int  # 0 .. samples_per_prompt - 1
    token_ids: list[int]  # the response
    finish_reason: str
    server: str  # the URL that sampled it

    @property
    def key(self) -> tuple[int, int]:
        return self.prompt, self.sample


class SampleShard:
    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # as it reads back (tuples -> lists)
        self.done: dict[tuple[int, int], Record] = {}
        if not (self.path.is_file() and self._load()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"header": self.header}) + "\n")
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> bool:
        """Read a past run's records; False if it left not even a whole header line."""
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # a kill can leave a partial last line: ignore it
        lines = data[:good].decode("utf-8").splitlines()
        if not lines:
            return False
        try:
            found = json.loads(lines[0]).get("header")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if not isinstance(found, dict):
            raise ValueError(f"{self.path} is not a sample shard (no header line); "
                             "delete it or choose another --out")  # fmt: skip
        if found != self.header:
            diff = sorted(k for k in {**found, **self.header} if found.get(k) != self.header.get(k))
            raise ValueError(f"{self.path} holds samples drawn with other settings "
                             f"({', '.join(diff)} differ); rerun with the same settings, or "
                             "choose another --out")  # fmt: skip
        for lineno, line in enumerate(lines[1:], 2):
            try:
                rec = Record(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{self.path}:{lineno}: not a sample record ({e})") from None
            self.done.setdefault(rec.key, rec)
        if good < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good)
        return True

    def add(self, rec: Record) -> None:
        """Append one record (skipped if its key is done) and flush it to the OS."""
        if rec.key in self.done:
            return
        self._file.write(json.dumps(asdict(rec), separators=(",", ":")) + "\n")
        self._file.flush()
        self.done[rec.key] = rec

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> SampleShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
