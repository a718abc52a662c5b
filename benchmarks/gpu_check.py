"""One GPU check, ready to run on a machine with one CUDA GPU (≤ 8 minutes on an H100-class GPU).

    python benchmarks/gpu_check.py                  # writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --skip-decode    # parity + exactness only (~1 min)

1. Parity: the default model (SmolLM2-135M-Instruct, `bebop model fetch`) in float32 and
   bfloat16 on the GPU against `transformers` on the same weights and device: max |Δ logit| over
   three chat prompts (float32 must be < 1e-3; bfloat16 is reported).
2. Exactness: the 6-token random target of tests/engine/test_engine_exactness.py with an unrelated
   random head, on the GPU, `rs` under the fixed and the auto policy: N = 20,000 samples of the
   first 3 tokens, G-test against exact probabilities from full forwards; pass when p > 1e-3.
3. Decode: benchmarks/decode.py on the default model and head, bf16, batch 1/4/16/64, T = 1
   (none / to / rs fixed / rs auto), its JSON and plot beside this file's.
Exits non-zero when a correctness check fails. Nothing here has run yet on a GPU: the first
run's figures are the first GPU figures of the project.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CHAT = ["Tom has 3 cats and buys 4 more. How many cats does he have?",
        "Write a Python function that reverses a string.", "What is the capital of France?"]  # fmt: skip


def parity(model_dir: Path, device: str) -> dict:
    """max |Δ logit| of the engine's target vs transformers, per dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bebop_spec.models import load_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=True,
                                       add_generation_prompt=True) for c in CHAT]  # fmt: skip
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(str(model_dir), dtype=dtype, device=device).target
        ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        worst = 0.0
        for p in prompts:
            ids = torch.tensor([list(p)], device=device)
            pos = torch.arange(ids.shape[1], device=device)[None]
            with torch.no_grad():
                a = ours.compute_logits(ours(ids, pos)).float()
                b = ref(ids).logits.float()
            worst = max(worst, (a - b).abs().max().item())
        out[str(dtype).removeprefix("torch.")] = worst
        del ours, ref
    return out


def exactness(device: str, n: int = 20_000, depth: int = 3) -> dict:
    """G-test p-values of the first `depth` tokens under rs (fixed and auto) on `device`."""
    from bebop_spec import LLM, SamplingParams
    from bebop_spec.testing import exact_joint, g_test, make_tiny_model

    vocab, prompt = 6, [1, 4, 2]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "m", vocab_size=vocab, seed=11,
                                eos_token_id=vocab + 100)  # fmt: skip
        out = {}
        for policy in ("fixed", "auto"):
            llm = LLM(str(model), mtp=str(model / "mtp"), draft_mode="rs", spec_policy=policy,
                      num_speculative_tokens=3, max_num_seqs=512, device=device,
                      dtype="float32", seed=7)  # fmt: skip
            params = SamplingParams(max_tokens=depth, n=n, ignore_eos=True, temperature=1.0)
            res = llm.generate([prompt], params)[0]
            idx = torch.tensor([c.token_ids for c in res.outputs])
            flat = (idx * torch.tensor([vocab ** (depth - 1 - i) for i in range(depth)])).sum(1)
            counts = torch.bincount(flat, minlength=vocab**depth).double()
            probs = exact_joint(model, params, prompt, vocab, depth, device)
            out[policy] = g_test(counts, probs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    from bebop_spec.models.default_model import ensure_smollm2

    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu"}
    report["parity_max_abs_logit_diff"] = parity(ensure_smollm2(), args.device)
    report["exactness_p_values"] = exactness(args.device)
    ok = report["parity_max_abs_logit_diff"]["float32"] < 1e-3 and all(
        p > 1e-3 for p in report["exactness_p_values"].values()
    )
    report["checks_passed"] = ok
    print(json.dumps(report, indent=2))
    if not args.skip_decode:
        decode_out = Path(args.out).with_name("decode_gpu.json")
        cmd = [sys.executable, str(Path(__file__).with_name("decode.py")), "--device", args.device,
               "--dtype", "bfloat16", "--batch-sizes", "1", "4", "16", "64", "--repeats", "1",
               "--out", str(decode_out)]  # fmt: skip
        report["decode"] = {"returncode": subprocess.run(cmd).returncode, "json": str(decode_out)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
