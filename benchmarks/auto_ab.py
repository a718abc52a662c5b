"""Auto policy vs plain decoding, interleaved: does speculation under `auto` ever lose?

    python benchmarks/auto_ab.py --batch-sizes 64 4 --rounds 3 --max-tokens 48

The decode benchmark times each engine once per batch size in a fixed order, which on a
small noisy CPU mixes warm-up and drift into the ratio. Here the two engines (no
speculation; `rs` with spec_policy="auto", the default model and its head) alternate for
`--rounds` rounds on the same seeded prompts; the ratio of best tokens/s is reported with
every round's figures and the policy's γ_t histogram. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from decode import demo_prompts  # noqa: E402

from bebop_spec import LLM, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="target dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "auto_ab.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    seqs = max(args.batch_sizes)
    llms = {"none": LLM(args.model, draft_mode=None, max_num_seqs=seqs),
            "auto": LLM(args.model, max_num_seqs=seqs)}  # fmt: skip
    rows = []
    for bs in args.batch_sizes:
        prompts = demo_prompts(llms["none"].tokenizer, bs, 0)
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0)
        for llm in llms.values():
            llm.generate(prompts[:2], params)  # warm-up
        tps = {name: [] for name in llms}
        for _ in range(args.rounds):
            for name, llm in llms.items():
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params)
                n = sum(len(c.token_ids) for o in outs for c in o.outputs)
                tps[name].append(n / (time.perf_counter() - t0))
        ratio = max(tps["auto"]) / max(tps["none"])
        rows.append({"batch": bs, "none_tok_s": tps["none"], "auto_tok_s": tps["auto"],
                     "ratio_of_best": ratio,
                     "gamma_chosen": list(llms["auto"].engine.gamma_policy.chosen)})  # fmt: skip
        print(f"batch {bs:3d}: plain {[round(x, 1) for x in tps['none']]}  auto "
              f"{[round(x, 1) for x in tps['auto']]}  auto/plain (best) {ratio:.3f}  "
              f"γ_t histogram {rows[-1]['gamma_chosen']}", flush=True)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
