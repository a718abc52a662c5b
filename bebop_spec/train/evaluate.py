"""Acceptance of an MTP head per position, draft mode, temperature and domain (DESIGN §2).

    cfg = EvalConfig(model="target", mtp="runs/mtp/head", data="data/heldout")
    rows = evaluate(cfg)                          # analytic and measured AcceptanceRows
    print(format_table(rows)); write_results(rows, cfg, "runs/eval")

Two estimates of the same quantities:
- analytic: on the teacher-forced γ-chains of held-out self-distilled sequences, with p and q
  processed at temperature T (and top-p) exactly as the engine does — q over the head's
  draft vocabulary when it is served with one (−∞ outside it, spec/draft_vocab.py):
      α_i(rs) = Σ_v min(p_i(v), q_i(v)),   α_i(to) = p_i(argmax q_i);
  per chain P(draft j accepted) = Π_{i≤j} α_i and E[A] = Σ_j Π_{i≤j} α_i, averaged over chains.
  (The chain feeds the data tokens, sampled from p at the data's temperature, where the engine
  feeds its accepted drafts; that is the usual teacher-forcing approximation.)
- measured: the embedded engine generates from the held-out prompts with draft_mode rs / to at
  temperature T; P(draft j accepted) = accepted_per_pos[j] / num_drafts and
  E[A] = num_accepted_tokens / num_drafts.
Reported per row: `per_pos[j]` = P(draft j accepted) (vLLM's per-position metric),
`alpha[j]` = per_pos[j] / per_pos[j-1] (acceptance at j given j-1 accepted), `accepted_length`
= E[A], `acceptance_rate` = E[A] / γ (accepted / drafted tokens), `entropy` = mean H(p) in nats.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bebop_spec.spec import (
    DRAFT_MODES,
    SamplingTensors,
    acceptance_rs,
    acceptance_to,
    entropy,
    process_logits,
)
from bebop_spec.train.data import DistillDataset, collate, read_dataset

SOURCES = ("analytic", "measured")
RESULTS_FILE, PLOT_FILE = "eval.json", "acceptance_per_pos.png"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalConfig:
    model: str  # target checkpoint directory
    mtp: str | None  # head directory; None: the model directory's own head
    data: str  # held-out self-distillation dataset
    gamma: int = 3
    temperatures: tuple[float, ...] = (0.6, 1.0)
    modes: tuple[str, ...] = DRAFT_MODES
    domains: tuple[str, ...] | None = None  # None: every domain of the dataset
    analytic: bool = True
    measured: bool = True
    max_sequences: int = 0  # analytic: sequences per domain (0: all)
    measure_prompts: int = 16  # measured: prompts per domain
    max_tokens: int = 128  # measured: tokens generated per prompt
    seq_len: int = 1024  # analytic: sequences truncated to this many tokens
    batch_size: int = 4  # analytic: sequences per forward
    top_p: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    # q over the head's K most frequent tokens, as the engine serves it: None = the head's own
    # default (its draft_vocab.json), 0 = the full vocabulary
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        self.temperatures = tuple(float(t) for t in self.temperatures)
        self.modes = tuple(self.modes)
        checks = [
            ("gamma", self.gamma >= 1, "must be >= 1"),
            ("temperatures", bool(self.temperatures) and min(self.temperatures) > 0,
             "must be non-empty and > 0 (greedy acceptance is p's argmax agreement)"),
            ("modes", bool(self.modes) and set(self.modes) <= set(DRAFT_MODES),
             f"must be a non-empty subset of {DRAFT_MODES}"),
            ("analytic", self.analytic or self.measured, "or measured must be on"),
            ("max_sequences", self.max_sequences >= 0, "must be >= 0"),
            ("measure_prompts", self.measure_prompts >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("seq_len", self.seq_len >= self.gamma + 2, "must be >= gamma + 2"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("dtype", self.dtype in _DTYPES, f"must be one of {sorted(_DTYPES)}"),
            ("draft_vocab_size", self.draft_vocab_size is None or self.draft_vocab_size >= 0,
             "must be >= 0 (or None)"),
        ]  # fmt: skip
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)!r} {why}")


@dataclass
class AcceptanceRow:
    domain: str
    mode: str  # rs | to
    temperature: float
    source: str  # analytic | measured
    per_pos: list[float]  # [γ] P(draft j accepted)
    accepted_length: float  # E[A], accepted drafts per verification step
    count: int  # chains (analytic) or verification steps (measured)
    entropy: float  # mean H(p) in nats over the positions seen
    alpha: list[float] = field(default_factory=list)  # [γ] per_pos[j] / per_pos[j-1]

    def __post_init__(self) -> None:
        if not self.alpha:
            prev = [1.0] + self.per_pos[:-1]
            self.alpha = [a / b if b > 0 else 0.0 for a, b in zip(self.per_pos, prev, strict=True)]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_length / len(self.per_pos) if self.per_pos else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


# ---------------------------------------------------------------- analytic


def _sampling(temperature: float, top_p: float, rows: int) -> SamplingTensors:
    from bebop_spec import SamplingParams

    sp = SamplingParams(temperature=temperature, top_p=top_p)
    return SamplingTensors.from_params([sp]).repeat_interleave(rows)


def chain_acceptance(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
    top_p: float = 1.0, outside_draft_vocab: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """draft/target logits [N,γ,V] -> {"rs": α[N,γ], "to": α[N,γ], "entropy": H(p)[N,γ]} with p
    and q processed at `temperature` / `top_p` (the engine's process_logits);
    `outside_draft_vocab` [V] bool: q = 0 on these tokens (a draft vocabulary)."""
    if outside_draft_vocab is not None:
        draft_logits = draft_logits.masked_fill(outside_draft_vocab, float("-inf"))
    n = draft_logits.shape[0]
    st = _sampling(temperature, top_p, n)
    p = process_logits(target_logits, st)
    q = process_logits(draft_logits, st)
    return {"rs": acceptance_rs(p, q), "to": acceptance_to(p, q), "entropy": entropy(p)}


class _Sums:
    """Running sums over chains of Π_{i≤j} α_i [γ], E[A] and H(p) for one row."""

    def __init__(self, gamma: int) -> None:
        self.reach = torch.zeros(gamma, dtype=torch.float64)
        self.entropy = 0.0
        self.count = 0

    def add(self, alpha: torch.Tensor, ent: torch.Tensor) -> None:
        self.reach += alpha.double().cumprod(-1).sum(0)
        self.entropy += float(ent.double().mean(-1).sum())
        self.count += alpha.shape[0]

    def row(self, domain: str, mode: str, temperature: float) -> AcceptanceRow:
        per_pos = (self.reach / max(self.count, 1)).tolist()
        return AcceptanceRow(domain, mode, temperature, "analytic", per_pos, sum(per_pos),
                             self.count, self.entropy / max(self.count, 1))  # fmt: skip


def _domain_rows(ds: DistillDataset, domain: str, limit: int) -> list[int]:
    idx = ds.meta.domains.index(domain)
    rows = [i for i in range(len(ds)) if int(ds.domain[i]) == idx]
    return rows[:limit] if limit else rows


@torch.no_grad()
def analytic_acceptance(
    target: torch.nn.Module, head: torch.nn.Module, ds: DistillDataset, cfg: EvalConfig,
    domains: Iterable[str], progress: bool = True, draft_ids: list[int] | None = None,
) -> list[AcceptanceRow]:  # fmt: skip
    """Rows of Σ min(p, q) / p(argmax q) acceptance on the teacher-forced chains of `ds`, q over
    `draft_ids` only when given (a draft vocabulary)."""
    from tqdm.auto import tqdm

    from bebop_spec.train.chain import teacher_forced_chain

    head.eval()
    # The engine's own attention context where the chain can mirror it (one-layer heads).
    context = "serve" if head.num_layers == 1 else "causal"
    outside = None
    if draft_ids is not None:
        outside = torch.ones(target.config.vocab_size, dtype=torch.bool, device=cfg.device)
        outside[torch.tensor(draft_ids, device=cfg.device)] = False
    out = []
    for domain in domains:
        rows = _domain_rows(ds, domain, cfg.max_sequences)
        sums = {(m, t): _Sums(cfg.gamma) for m in cfg.modes for t in cfg.temperatures}
        starts = range(0, len(rows), cfg.batch_size)
        for s in tqdm(starts, desc=f"analytic {domain}", disable=not progress, leave=False):
            batch = collate([ds.sequence(i) for i in rows[s : s + cfg.batch_size]], cfg.seq_len)
            ids, mask = batch.input_ids.to(cfg.device), batch.loss_mask.to(cfg.device)
            chain = teacher_forced_chain(target, head, ids, mask, cfg.gamma, context=context)
            if chain.num_chains == 0:
                continue
            for t in cfg.temperatures:
                acc = chain_acceptance(chain.draft_logits, chain.target_logits, t, cfg.top_p,
                                       outside)  # fmt: skip
                for m in cfg.modes:
                    sums[m, t].add(acc[m].cpu(), acc["entropy"].cpu())
        out += [s.row(domain, m, t) for (m, t), s in sums.items() if s.count]
    return out


# ---------------------------------------------------------------- measured


def measured_acceptance(
    cfg: EvalConfig, prompts: dict[str, list[list[int]]], progress: bool = True
) -> list[AcceptanceRow]:
    """Rows of acceptance counted by the engine generating from `prompts` (domain -> ids)."""
    from bebop_spec import LLM, SamplingParams

    flat = [(d, ids) for d, group in prompts.items() for ids in group]
    if not flat:
        return []
    out = []
    max_len = max(len(ids) for _, ids in flat) + cfg.max_tokens + cfg.gamma + 2
    for mode in cfg.modes:
        llm = LLM(cfg.model, mtp=cfg.mtp, num_speculative_tokens=cfg.gamma, draft_mode=mode,
                  draft_vocab_size=cfg.draft_vocab_size,
                  spec_policy="fixed",  # measures the head at γ: every step drafts γ
                  max_num_seqs=min(64, len(flat)), max_model_len=max_len, dtype=cfg.dtype,
                  device=cfg.device, seed=cfg.seed)  # fmt: skip
        for t in cfg.temperatures:
            params = [
                SamplingParams(
                    temperature=t,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens,
                    seed=cfg.seed * 1_000_003 + i,
                )  # fmt: skip
                for i in range(len(flat))
            ]
            if progress:
                print(f"measuring {mode} T={t:g} on {len(flat)} prompts", flush=True)
            outs = llm.generate([ids for _, ids in flat], params, use_tqdm=progress)
            for domain in prompts:
                mine = [o for (d, _), o in zip(flat, outs, strict=True) if d == domain]
                out.append(_measured_row(domain, mode, t, mine, cfg.gamma))
    return out


def _measured_row(domain: str, mode: str, t: float, outs: list, gamma: int) -> AcceptanceRow:
    drafts = sum(o.spec.num_drafts for o in outs)
    accepted = sum(o.spec.num_accepted_tokens for o in outs)
    per_pos = [0] * gamma
    for o in outs:
        for j, a in enumerate(o.spec.accepted_per_pos[:gamma]):
            per_pos[j] += a
    ents = [h for o in outs for c in o.outputs for h in c.entropies]
    d = max(drafts, 1)
    return AcceptanceRow(domain, mode, t, "measured", [a / d for a in per_pos], accepted / d,
                         drafts, sum(ents) / max(len(ents), 1))  # fmt: skip


# ---------------------------------------------------------------- the whole evaluation


def _check_data(ds: DistillDataset, vocab: int) -> None:
    top = int(ds.input_ids.max())
    if top >= vocab:
        raise ValueError(f"dataset token id {top} is outside the target's vocabulary ({vocab})")


def evaluate(cfg: EvalConfig, progress: bool = True) -> list[AcceptanceRow]:
    """Analytic and/or measured rows for every (domain, mode, temperature) of cfg."""
    from bebop_spec.models import load_model
    from bebop_spec.models.mtp_io import resolve_draft_vocab
    from bebop_spec.train.selfdistill import prompts_of

    ds = read_dataset(cfg.data)
    domains = list(cfg.domains or ds.meta.domains)
    missing = [d for d in domains if d not in ds.meta.domains]
    if missing:
        raise ValueError(f"dataset {cfg.data} has no domain {missing}; it has {ds.meta.domains}")
    loaded = load_model(cfg.model, mtp=cfg.mtp, dtype=_DTYPES[cfg.dtype], device=cfg.device)
    if loaded.mtp is None:
        raise ValueError(f"no MTP head: {cfg.model} has none and no --mtp was given")
    vocab = loaded.config.vocab_size
    _check_data(ds, vocab)
    draft_ids = resolve_draft_vocab(cfg.mtp or cfg.model, cfg.draft_vocab_size, vocab)
    rows = []
    if cfg.analytic:
        rows += analytic_acceptance(loaded.target.eval(), loaded.mtp, ds, cfg, domains, progress,
                                    draft_ids)  # fmt: skip
    del loaded
    if cfg.measured:
        prompts = {d: prompts_of(ds, d, cfg.measure_prompts) for d in domains}
        rows += measured_acceptance(cfg, prompts, progress)
    return rows


# ---------------------------------------------------------------- reporting


def _fmt(row: AcceptanceRow | None) -> str:
    if row is None:
        return "-"
    pos = " ".join(f"{a:.3f}" for a in row.per_pos)
    return f"{pos}  {row.accepted_length:.3f}  {100 * row.acceptance_rate:5.1f}"


def format_table(rows: list[AcceptanceRow]) -> str:
    """One line per (domain, T, mode): P(draft j accepted) per position, E[A], acceptance %,
    for the analytic and the measured estimate side by side."""
    keyed = {(r.domain, r.temperature, r.mode, r.source): r for r in rows}
    keys = sorted({k[:3] for k in keyed}, key=lambda k: (k[0], k[1], k[2]))
    gamma = max((len(r.per_pos) for r in rows), default=0)
    head = " ".join(f"p{j + 1:<4}" for j in range(gamma)) + "  E[A]   acc%"
    lines = [f"{'domain':<8} {'T':>4} {'mode':<4} | analytic: {head} | measured: {head}"]
    for d, t, m in keys:
        a, me = keyed.get((d, t, m, "analytic")), keyed.get((d, t, m, "measured"))
        lines.append(f"{d:<8} {t:>4g} {m:<4} | {'':10}{_fmt(a)} | {'':10}{_fmt(me)}")
    return "\n".join(lines)


def plot_per_position(rows: list[AcceptanceRow], out_png: str | Path, title: str = "") -> Path:
    """P(draft j accepted) against j: one panel per (mode, T), a colour per domain, analytic
    solid and measured dashed."""
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    panels = sorted({(r.mode, r.temperature) for r in rows})
    domains = sorted({r.domain for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (mode, t) in zip(axes[0], panels, strict=True):
        for i, d in enumerate(domains):
            for r in rows:
                if (r.mode, r.temperature, r.domain) != (mode, t, d):
                    continue
                style = "-o" if r.source == "analytic" else "--x"
                xs = range(1, len(r.per_pos) + 1)
                ax.plot(xs, r.per_pos, style, color=colours[i % len(colours)],
                        label=f"{d} {r.source}")  # fmt: skip
        ax.set(title=f"{mode}, T={t:g}", xlabel="draft position j", ylim=(0, 1.02),
               ylabel="P(draft j accepted)")  # fmt: skip
        ax.set_xticks(range(1, max(len(r.per_pos) for r in rows) + 1))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_results(rows: list[AcceptanceRow], cfg: EvalConfig, out_dir: str | Path) -> Path:
    """out_dir/eval.json (config + rows) and out_dir/acceptance_per_pos.png; returns the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    doc = {"config": asdict(cfg), "rows": [r.to_json() for r in rows]}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    if rows:
        plot_per_position(rows, out / PLOT_FILE, title=f"MTP head {cfg.mtp or cfg.model}")
    return path


__all__ = [
    "AcceptanceRow",
    "EvalConfig",
    "analytic_acceptance",
    "chain_acceptance",
    "evaluate",
    "format_table",
    "measured_acceptance",
    "plot_per_position",
    "write_results",
]
