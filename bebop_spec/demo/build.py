"""Build the demo model offline: corpus -> tokenizer -> target -> evaluate (-> MTP head).

    python -m bebop_spec.demo.build            # full build into the cache (about 6 min, 2 cores)
    python -m bebop_spec.demo.build --force    # rebuild every stage

    from bebop_spec.demo.build import DemoBuildConfig, build_demo, demo_model_path, ensure_demo
    model_dir = ensure_demo()                  # builds once, then returns the cached directory

Layout under the cache root (`$BEBOP_CACHE_DIR/demo`, else `$XDG_CACHE_HOME/bebop/demo`, else
`~/.cache/bebop/demo`): `corpus/`, `tokenizer/`, `target/` (the model: config.json,
model.safetensors, tokenizer, train_log.jsonl, training_curve.png), `eval/report.json`, `head/`.
Each stage writes `stage.json` holding a hash of its own config and code chained with the hashes
of the stages before it; a stage whose hash matches is skipped, so changing the target's size
retrains the target and re-evaluates, but keeps the corpus and tokenizer. Stages are built in a
temporary directory and renamed into place, and a file lock serialises concurrent builds.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bebop_spec.demo.corpus import CorpusConfig, build_corpus
from bebop_spec.demo.evaluate import EvalConfig, evaluate_target
from bebop_spec.demo.target import TargetConfig, train_target
from bebop_spec.demo.tokenizer import TokenizerConfig, train_tokenizer

STAGE_FILE = "stage.json"
# The modules whose code decides each stage's output: their syntax trees (not comments or
# formatting) are part of the stage hash, so editing a generator rebuilds from that stage on.
STAGE_SOURCES = {
    "corpus": ("chat", "math_task", "code_task", "agent_task", "corpus"),
    "tokenizer": ("tokenizer",),
    "target": ("target",),
    "eval": ("evaluate",),
}
HeadTrainer = Callable[[Path, Path], object]  # train_head(target_dir, out_dir)


def source_digest(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in modules:
        h.update(ast.dump(ast.parse(Path(__file__).with_name(f"{name}.py").read_text())).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    if os.environ.get("BEBOP_CACHE_DIR"):
        return Path(os.environ["BEBOP_CACHE_DIR"]).expanduser() / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bebop" / "demo"


@dataclass(frozen=True)
class DemoBuildConfig:
    seed: int = 0
    cache_dir: Path | None = None  # None: default_cache_dir() at the time of use
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.target.max_position_embeddings > self.tokenizer.model_max_length:
            raise ValueError("target.max_position_embeddings exceeds tokenizer.model_max_length")

    @classmethod
    def micro(cls, cache_dir: Path, seed: int = 0) -> DemoBuildConfig:
        """Seconds-long build with the real pipeline at toy sizes (tests, smoke runs)."""
        return cls(
            seed=seed,
            cache_dir=Path(cache_dir),
            corpus=CorpusConfig(math_train=300, math_heldout=8, agent_train=100, agent_heldout=4,
                                code_train_chars=30_000, code_heldout_chars=4_000),
            tokenizer=TokenizerConfig(vocab_size=384, model_max_length=256),
            target=TargetConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=16, intermediate_size=64, max_position_embeddings=256,
                                seq_len=64, batch_size=2, steps=3, warmup_steps=1,
                                bf16_autocast=False, num_threads=None),
            eval=EvalConfig(loss_examples=4, math_problems=4, math_max_new_tokens=8, batch_size=4),
        )  # fmt: skip

    @property
    def root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def target_dir(self) -> Path:
        return self.root / "target"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def report_path(self) -> Path:
        return self.eval_dir / "report.json"

    @property
    def head_dir(self) -> Path:
        return self.root / "head"

    def stage_hashes(self) -> dict[str, str]:
        """Chained config + code hashes: each stage's hash covers every stage before it."""
        py = ".".join(map(str, sys.version_info[:3]))  # the code corpus is this stdlib
        parts = {
            "corpus": {"seed": self.seed, "python": py, **dataclasses.asdict(self.corpus)},
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "target": dataclasses.asdict(self.target),
            "eval": dataclasses.asdict(self.eval),
        }
        hashes, prev = {}, "bebop-demo"
        for name, part in parts.items():
            code = source_digest(STAGE_SOURCES[name])
            blob = json.dumps({"prev": prev, "code": code, name: part}, sort_keys=True)
            prev = hashes[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return hashes


def _stage_hash(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / STAGE_FILE).read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None


def run_stage(name: str, out_dir: Path, key: str, fn: Callable[[Path], dict], force: bool) -> dict:
    """Run `fn(tmp_dir)` unless `out_dir` already holds this `key`; returns its stage record."""
    if not force and _stage_hash(out_dir) == key:
        return json.loads((out_dir / STAGE_FILE).read_text())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    summary = fn(tmp) or {}
    record = {"stage": name, "hash": key, "seconds": round(time.perf_counter() - start, 1),
              "summary": summary}  # fmt: skip
    (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return record


@contextlib.contextmanager
def _build_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with (root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _head_key(target_hash: str, train_head: HeadTrainer) -> str:
    """The head is retrained when the target or the trainer (name, or its `cache_key`) changes."""
    name = f"{getattr(train_head, '__module__', '')}.{getattr(train_head, '__qualname__', '')}"
    blob = f"{target_hash}:{name}:{getattr(train_head, 'cache_key', '')}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stages(cfg: DemoBuildConfig, progress: bool, train_head: HeadTrainer | None) -> list:
    """(name, out_dir, hash, fn(tmp_dir) -> summary) in build order."""
    h, s = cfg.stage_hashes(), cfg.seed
    stages = [
        ("corpus", cfg.corpus_dir, h["corpus"], lambda d: build_corpus(cfg.corpus, s, d)),
        ("tokenizer", cfg.tokenizer_dir, h["tokenizer"],
         lambda d: {"vocab_size": len(train_tokenizer(cfg.tokenizer, cfg.corpus_dir, d, progress))}),
        ("target", cfg.target_dir, h["target"],
         lambda d: train_target(cfg.target, s, cfg.corpus_dir, cfg.tokenizer_dir, d, progress)),
        ("eval", cfg.eval_dir, h["eval"],
         lambda d: evaluate_target(cfg.target_dir, cfg.corpus_dir, cfg.eval, s, d / "report.json",
                                   progress=progress)),
    ]  # fmt: skip
    if train_head is not None:
        key = _head_key(h["target"], train_head)
        stages.append(("head", cfg.head_dir, key, lambda d: train_head(cfg.target_dir, d)))
    return stages


def build_demo(
    cfg: DemoBuildConfig | None = None,
    force: bool = False,
    train_head: HeadTrainer | None = None,
    progress: bool = True,
) -> Path:
    """Build (or reuse) every stage; returns the target model directory.

    `train_head(target_dir, out_dir)` trains the MTP head into `out_dir`; it may return a dict
    summary. Give it a `cache_key` attribute to retrain when its own settings change.
    """
    cfg = cfg or DemoBuildConfig()
    with _build_lock(cfg.root):
        stages = _stages(cfg, progress, train_head)
        bar = tqdm(stages, desc="demo build", disable=not progress, dynamic_ncols=True)
        records = {}
        for name, out_dir, key, fn in bar:
            bar.set_postfix(stage=name)
            records[name] = run_stage(name, out_dir, key, fn, force)
        build = {n: {"seconds": r["seconds"], "hash": r["hash"]} for n, r in records.items()}
        (cfg.root / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    return cfg.target_dir


def is_built(cfg: DemoBuildConfig | None = None, train_head: HeadTrainer | None = None) -> bool:
    """True when every stage on disk matches `cfg` (and the head, if `train_head` is given)."""
    cfg = cfg or DemoBuildConfig()
    return all(_stage_hash(d) == key for _, d, key, _ in _stages(cfg, False, train_head))


def demo_model_path(cfg: DemoBuildConfig | None = None) -> Path:
    """Where the demo target model lives (whether or not it has been built yet)."""
    return (cfg or DemoBuildConfig()).target_dir


def ensure_demo(
    cfg: DemoBuildConfig | None = None,
    train_head: HeadTrainer | None = None,
    progress: bool = True,
) -> Path:
    """The demo model directory, building whatever is missing or stale first."""
    cfg = cfg or DemoBuildConfig()
    if is_built(cfg, train_head):
        return cfg.target_dir
    return build_demo(cfg, train_head=train_head, progress=progress)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the Bebop demo model.")
    ap.add_argument("--force", action="store_true", help="rebuild every stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None, help="target training steps")
    args = ap.parse_args(argv)
    cfg = DemoBuildConfig(seed=args.seed, cache_dir=args.cache_dir)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, steps=args.steps))
    start = time.perf_counter()
    path = build_demo(cfg, force=args.force)
    print(f"demo model: {path} ({time.perf_counter() - start:.0f} s)")
    print(cfg.report_path.read_text())


if __name__ == "__main__":
    main()
