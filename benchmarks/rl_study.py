"""RL study: one GRPO run, six rollout configurations — Bebop's findings reproduced end to end.

    python benchmarks/rl_study.py                                   # demo model, full budget
    python benchmarks/rl_study.py --steps 8 --prompts-per-step 4 --group-size 4 --max-tokens 96
    python benchmarks/rl_study.py --configs none,to_ce,rs_tv --model DIR --ce-head H --tv-head H

Every configuration runs `clients/examples/grpo.py` (trainer process + server subprocess +
gloo pushes) with the same seed, prompts, samples per step and max tokens; only the rollout
side changes: no speculation; `to` + CE head; `rs` + CE head; `rs` + e2e-TV head; and the
e2e-TV head trained online with TV (or CE) on the fresh rollouts (`--online-head`, pushed
with selector "draft"). These draft a fixed γ on every step, so their acceptance compares
alike; `rs_tv_auto` (not in the default set) serves the e2e-TV head under the `auto` policy,
which drafts only where it pays, for the step speedup a user would get. Heads come from `bebop mtp data` + `bebop mtp train --loss ce|e2e_tv`
(one dataset, one budget, cached under --cache-dir) unless given. Per step it logs entropy,
acceptance, accepted length, rollout and step time; per configuration it fits acceptance
against entropy (`bebop_spec.analysis`: per draft position from the /metrics entropy buckets,
and per step against the policy's mean entropy) and reports drift and speedup. Writes
OUT/study.json, OUT/table.md, OUT/rl_study.png, OUT/acceptance_vs_entropy.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from bebop_spec.analysis.rl_study import add_speedups, check_targets, plot, summarize, table

REPO = Path(__file__).resolve().parents[1]
GRPO = REPO / "clients" / "examples" / "grpo.py"


@dataclass(frozen=True)
class Config:
    draft_mode: str
    head: str | None  # "ce" | "e2e_tv": which pre-RL head is served
    online: str | None  # loss of the online head updates, None: frozen
    label: str
    spec_policy: str = "fixed"  # "auto": γ_t chosen per step (engine/gamma.py)


CONFIGS = {
    "none": Config("none", None, None, "no speculation"),
    "to_ce": Config("to", "ce", None, "to + CE head"),
    "rs_ce": Config("rs", "ce", None, "rs + CE head"),
    "rs_tv": Config("rs", "e2e_tv", None, "rs + e2e-TV head"),
    "rs_tv_online_tv": Config("rs", "e2e_tv", "e2e_tv", "rs + e2e-TV, online TV"),
    "rs_tv_online_ce": Config("rs", "e2e_tv", "ce", "rs + e2e-TV, online CE"),
    "rs_tv_auto": Config("rs", "e2e_tv", None, "rs + e2e-TV, auto γ", spec_policy="auto"),
}
# The study's default set: each drafts every step (fixed γ), so acceptance is measured alike.
DEFAULT_CONFIGS = [n for n, c in CONFIGS.items() if c.spec_policy == "fixed"]


# ------------------------------------------------------------------------ setup: heads
def bebop(*args: str) -> None:
    """`python -m bebop_spec.cli ...`; RuntimeError with its last output line on failure."""
    proc = subprocess.run([sys.executable, "-m", "bebop_spec.cli", *args], capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"bebop {' '.join(args[:2])} failed: {tail[0]}")


def model_key(model: Path) -> str:
    st = (model / "model.safetensors").stat()
    blob = json.dumps([str(model.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_head(model: Path, loss: str, data: Path, run: Path, steps: int, lr: float,
               init_from: Path | None, seed: int) -> Path:  # fmt: skip
    """`bebop mtp train` into run/ (skipped when run/head exists); returns run/head."""
    head = run / "head"
    if (head / "model.safetensors").exists():
        return head
    init = ["--init-from", str(init_from)] if init_from else []
    bebop("mtp", "train", "--model", str(model), "--data", str(data), "--out", str(run),
          "--loss", loss, "--steps", str(steps), "--lr", str(lr), "--batch-size", "8",
          "--seq-len", "384", "--warmup", "10", "--save-every", "0", "--seed", str(seed),
          *init, "--overwrite", "--quiet")  # fmt: skip
    return head


def ensure_heads(model: Path, needed: set[str], args: argparse.Namespace) -> dict[str, str]:
    """{"ce"|"e2e_tv": head dir}: the given ones, else made here as benchmarks/losses.py does
    (one self-distilled dataset; a shared forward-KL warm start from a random head, since TV
    gradients are small on a random head; then --head-steps of each loss), cached."""
    given = {"ce": args.ce_head, "e2e_tv": args.tv_head}
    heads = {k: str(v) for k, v in given.items() if k in needed and v}
    todo = sorted(needed - set(heads))
    if not todo:
        return heads
    root = Path(args.cache_dir or model.parent / "rl_study_heads") / model_key(model)
    data = root / f"data-p{args.head_prompts}-t{args.head_max_tokens}-s{args.seed}"
    if not (data / "meta.json").exists():
        print(f"setup: self-distillation data -> {data}", flush=True)
        bebop("mtp", "data", "--model", str(model), "--out", str(data), "--num-prompts",
              str(args.head_prompts), "--max-tokens", str(args.head_max_tokens), "--seed",
              str(args.seed), "--quiet")  # fmt: skip
    warm = None
    if args.head_warm_steps:
        run = data.with_name(f"{data.name}-fkl{args.head_warm_steps}")
        print(f"setup: warm start, {args.head_warm_steps} fkl steps -> {run}", flush=True)
        warm = train_head(model, "fkl", data, run, args.head_warm_steps, 2e-3, None, args.seed)
    for loss in todo:
        run = data.with_name(f"{data.name}-w{args.head_warm_steps}-{loss}{args.head_steps}")
        print(f"setup: {loss} head, {args.head_steps} steps -> {run}", flush=True)
        heads[loss] = str(train_head(model, loss, data, run, args.head_steps, 1e-3, warm,
                                     args.seed))  # fmt: skip
    return heads


# ------------------------------------------------------------------------- runs
def grpo_command(cfg: Config, model: Path, heads: dict, out: Path, args) -> list[str]:
    cmd = [sys.executable, str(GRPO), "--model", str(model), "--draft-mode", cfg.draft_mode,
           "--out", str(out), "--steps", str(args.steps), "--prompts-per-step",
           str(args.prompts_per_step), "--group-size", str(args.group_size), "--max-tokens",
           str(args.max_tokens), "--lr", str(args.lr), "--temperature", str(args.temperature),
           "--entropy-coef", str(args.entropy_coef), "--seed", str(args.seed), "--quiet",
           "--spec-policy", cfg.spec_policy]  # fmt: skip
    if args.temperature_end is not None:
        cmd += ["--temperature-end", str(args.temperature_end)]
    if cfg.head:
        cmd += ["--mtp", heads[cfg.head]]
    if cfg.online:
        cmd += ["--online-head", cfg.online]
    return cmd + ([] if args.async_mode else ["--sync"])


def read_steps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_config(name: str, cmd: list[str], out: Path, bar: tqdm, steps: int) -> dict:
    """Run one configuration, advancing `bar` per logged step; its records (or error)."""
    out.mkdir(parents=True, exist_ok=True)
    load0, t0, seen = os.getloadavg()[0], time.perf_counter(), 0
    with (out / "grpo.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                n = len(read_steps(out / "steps.jsonl"))
                if n > seen:
                    bar.update(n - seen)
                    seen = n
        finally:  # interrupted: grpo.py stops its server when terminated
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    records = read_steps(out / "steps.jsonl")
    bar.update(len(records) - seen)
    info = {"records": records, "wall_s": time.perf_counter() - t0,
            "loadavg": [load0, os.getloadavg()[0]]}  # fmt: skip
    if proc.returncode or len(records) < steps:
        lines = (out / "grpo.log").read_text(errors="replace").strip().splitlines()
        info["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
        bar.write(f"{name}: failed: {info['error']}")
    return info


# --------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--configs", default=",".join(DEFAULT_CONFIGS),
      help=f"comma-separated, of {', '.join(CONFIGS)} (default: all but rs_tv_auto)")  # fmt: skip
    a("--model", help="target dir (default: the demo model, built once)")
    a("--ce-head", help="CE head dir (default: trained in the setup stage, cached)")
    a("--tv-head", help="e2e-TV head dir (default: trained in the setup stage, cached)")
    a("--cache-dir", help="where setup-stage heads are cached (default: next to the model)")
    a("--head-warm-steps", type=int, default=60, help="setup: shared forward-KL warm start")
    a("--head-steps", type=int, default=60, help="setup: steps of each loss after the warm start")
    a("--head-prompts", type=int, default=96, help="setup: self-distillation prompts per domain")
    a("--head-max-tokens", type=int, default=192)
    a("--steps", type=int, default=20)
    a("--prompts-per-step", type=int, default=8)
    a("--group-size", type=int, default=8)
    a("--max-tokens", type=int, default=128)
    a("--lr", type=float, default=2e-5)
    a("--temperature", type=float, default=1.0)
    a("--temperature-end", type=float, help="linear temperature schedule (raises entropy)")
    a("--entropy-coef", type=float, default=0.0, help="entropy bonus (raises entropy)")
    a("--seed", type=int, default=0)
    a("--async", dest="async_mode", action="store_true",
      help="overlap rollouts with updates (default: sync, for clean step times)")  # fmt: skip
    a("--warmup", type=int, default=1, help="first steps left out of the mean times")
    a("--resume", action="store_true", help="keep configurations already complete in --out")
    a("--out", default=str(REPO / "benchmarks" / "results" / "rl_study"))
    return p


def run_all(names: list[str], model: Path, heads: dict, args) -> dict:
    out = Path(args.out)
    bar = tqdm(total=len(names) * args.steps, desc="rl study", unit="step", dynamic_ncols=True)
    runs = {}
    for name in names:
        bar.set_postfix(config=name)
        cmd = grpo_command(CONFIGS[name], model, heads, out / name, args)
        saved = out / name / "cmd.json"
        done = read_steps(out / name / "steps.jsonl")
        if args.resume and len(done) == args.steps and saved.exists() and \
                json.loads(saved.read_text()) == cmd[1:]:  # fmt: skip
            runs[name] = {"records": done, "resumed": True}
            bar.update(len(done))
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(cmd[1:]))
        runs[name] = run_config(name, cmd, out / name, bar, args.steps)
    bar.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        sys.exit(f"rl_study: unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args.model:
        model = Path(args.model)
    else:
        from bebop_spec.demo.build import ensure_demo

        model = ensure_demo()
    heads = ensure_heads(model, {CONFIGS[n].head for n in names} - {None}, args)
    t0 = time.perf_counter()
    runs = run_all(names, model, heads, args)
    summaries = {n: summarize(r["records"], args.warmup) for n, r in runs.items() if r["records"]}
    add_speedups(summaries)
    targets = check_targets(summaries)
    out = Path(args.out)
    study = {"args": vars(args), "model": str(model), "heads": heads, "targets": targets,
             "wall_s": time.perf_counter() - t0, "summaries": summaries,
             "runs": {n: {k: v for k, v in r.items() if k != "records"} for n, r in runs.items()}}  # fmt: skip
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    labels = {name: cfg.label for name, cfg in CONFIGS.items()}
    md = table(summaries, labels)
    (out / "table.md").write_text(md + "\n")
    plot(runs, summaries, out, labels)
    print(md)
    for t in targets:
        print(f"- {'met' if t['met'] else 'NOT met'}: {t['target']}: {t['measured']}")
    moved = [abs(s["entropy_last"] - s["entropy_first"]) for s in summaries.values()
             if s["entropy_first"] is not None]  # fmt: skip
    if moved and max(moved) < 0.3:
        print("note: the policy entropy barely moved; to see acceptance against entropy, raise it "
              "with --temperature-end 1.2 (a sampling-temperature schedule) or --entropy-coef")  # fmt: skip
    print(f"results -> {out}  ({study['wall_s'] / 60:.1f} min)")
    return 0 if all("error" not in r for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
