#!/usr/bin/env bash
# GPU validation of Bebop's vLLM / SGLang patches: acceptance and throughput, with and
# without the patches, on the same model, prompts and sampling settings.
#
#   benchmarks/validate_engines.sh vllm   [MODEL]     # default MODEL: XiaomiMiMo/MiMo-7B-RL (has MTP)
#   benchmarks/validate_engines.sh sglang [MODEL]
#
# Needs: a CUDA GPU, the engine installed in the current Python (pip install vllm==0.33.0
# or sglang==0.5.23), bebop-spec installed (for `bebop patch`), write access to the
# engine's site-packages. Environment knobs (defaults): PORT=8377 N=256 CONCURRENCY=32
# MAX_TOKENS=256 GAMMA=3 OUT=bench_out/<engine>-<time> SERVER_ARGS="" (extra server flags)
# PROMPTS=<file with one prompt per line> (a built-in set otherwise).
#
# For each tree state (unpatched, patched) it starts the server once with probabilistic
# drafting (RS), runs the load at three sampling settings and writes
# OUT/<state>-<setting>.json (tokens/s, mean accepted length, acceptance rate and, when
# patched, acceptance by target-entropy bucket) and OUT/summary.md. A last run without
# speculation gives the plain decoding throughput. The original tree state is restored
# on exit. Expected: identical behaviour at top_p=1/top_k off (nothing to process), and
# a higher acceptance with the patches wherever top-k / top-p cut the target's tail.
set -euo pipefail

ENGINE=${1:?usage: validate_engines.sh vllm|sglang [MODEL]}
MODEL=${2:-XiaomiMiMo/MiMo-7B-RL}
PORT=${PORT:-8377}
N=${N:-256}
CONCURRENCY=${CONCURRENCY:-32}
MAX_TOKENS=${MAX_TOKENS:-256}
GAMMA=${GAMMA:-3}
OUT=${OUT:-bench_out/${ENGINE}-$(date +%Y%m%d-%H%M%S)}
SETTINGS=("1.0 1.0 0" "1.0 0.9 50" "0.7 0.8 20")  # temperature top_p top_k (0 = off)
mkdir -p "$OUT"
bp() { python -m bebop_spec.patching "$@"; }  # = `bebop patch`

case "$ENGINE" in vllm | sglang) ;; *) echo "engine must be vllm or sglang" >&2; exit 2 ;; esac
bp "$ENGINE" --check >/dev/null || { echo "bebop patch $ENGINE --check failed: wrong version or modified tree" >&2; exit 2; }
ORIGINAL_STATE=$(bp "$ENGINE" --check | head -1 | awk '{print $NF}')  # clean | applied

SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
}
restore() {
  stop_server
  if [[ "$ORIGINAL_STATE" == "applied" ]]; then bp "$ENGINE" >/dev/null; else bp "$ENGINE" --revert >/dev/null; fi
}
trap restore EXIT

start_server() {  # $1: spec | nospec, $2: log name
  local spec=$1 log="$OUT/server-$2.log"
  if [[ "$ENGINE" == vllm ]]; then
    local sargs=()
    [[ "$spec" == spec ]] && sargs=(--speculative-config "{\"method\":\"mtp\",\"num_speculative_tokens\":$GAMMA,\"draft_sample_method\":\"probabilistic\"}")
    # shellcheck disable=SC2086
    vllm serve "$MODEL" --port "$PORT" --max-num-seqs "$CONCURRENCY" "${sargs[@]}" $SERVER_ARGS >"$log" 2>&1 &
  else
    local sargs=()
    [[ "$spec" == spec ]] && sargs=(--speculative-algorithm EAGLE --speculative-num-steps "$GAMMA" --speculative-eagle-topk 1
      --speculative-num-draft-tokens $((GAMMA + 1)) --speculative-use-rejection-sampling)
    # shellcheck disable=SC2086
    python -m sglang.launch_server --model-path "$MODEL" --port "$PORT" --enable-metrics \
      --max-running-requests "$CONCURRENCY" "${sargs[@]}" $SERVER_ARGS >"$log" 2>&1 &
  fi
  SERVER_PID=$!
  for _ in $(seq 1 900); do
    curl -sf "localhost:$PORT/health" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died, see $log" >&2; exit 1; }
    sleep 1
  done
  echo "server did not become healthy in 15 min, see $log" >&2; exit 1
}

run_load() {  # $1 tag, $2 temperature, $3 top_p, $4 top_k
  python - "$ENGINE" "$PORT" "$MODEL" "$N" "$CONCURRENCY" "$MAX_TOKENS" "$2" "$3" "$4" "${PROMPTS:-}" >"$OUT/$1.json" <<'PY'
import asyncio, json, re, sys, time
import httpx

engine, port, model, n, conc, max_tokens, temp, top_p, top_k, prompts_file = sys.argv[1:]
n, conc, max_tokens, top_k = int(n), int(conc), int(max_tokens), int(top_k)
temp, top_p = float(temp), float(top_p)
base = f"http://localhost:{port}"
if prompts_file:
    prompts = [ln.strip() for ln in open(prompts_file) if ln.strip()]
else:
    prompts = [f"Question {i}: explain, step by step, {t}." for i, t in enumerate([
        "how a hash map handles collisions", "why the sky is blue", "the proof that sqrt(2) is irrational",
        "how to reverse a linked list in Python", "what a Fourier transform does", "how TCP congestion control works",
        "the causes of the French revolution", "how rejection sampling stays exact"])]

def scrape(text):
    vals = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            vals[name] = vals.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return vals

def total(vals, metric, **labels):
    out = 0.0
    for key, v in vals.items():
        base_name = key.split("{", 1)[0]
        if base_name != metric:
            continue
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            out += v
    return out

async def main():
    async with httpx.AsyncClient(timeout=600) as client:
        before = scrape((await client.get(f"{base}/metrics")).text)
        sem = asyncio.Semaphore(conc)
        tokens, spec = [], []
        async def one(i):
            async with sem:
                p = prompts[i % len(prompts)]
                if engine == "sglang":
                    sp = {"max_new_tokens": max_tokens, "temperature": temp, "top_p": top_p, "top_k": top_k or -1}
                    r = (await client.post(f"{base}/generate", json={"text": p, "sampling_params": sp})).json()
                    meta = r["meta_info"]
                    tokens.append(meta["completion_tokens"])
                    spec.append((meta.get("spec_verify_ct", 0), meta["completion_tokens"]))
                else:
                    body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": temp,
                            "top_p": top_p, "top_k": top_k or -1}
                    r = (await client.post(f"{base}/v1/completions", json=body)).json()
                    tokens.append(r["usage"]["completion_tokens"])
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        after = scrape((await client.get(f"{base}/metrics")).text)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    res = {"engine": engine, "temperature": temp, "top_p": top_p, "top_k": top_k, "requests": n,
           "completion_tokens": sum(tokens), "seconds": wall, "tokens_per_s": sum(tokens) / wall}
    if engine == "vllm":
        drafts = total(d, "vllm:spec_decode_num_drafts_total")
        dt = total(d, "vllm:spec_decode_num_draft_tokens_total")
        acc = total(d, "vllm:spec_decode_num_accepted_tokens_total")
        if drafts:
            res.update(mean_accepted_length=1 + acc / drafts, acceptance_rate=acc / dt)
        prefix = "vllm:bebop_spec_decode_num_"
    else:
        verify = sum(v for v, _ in spec)
        if verify:
            res.update(mean_accepted_length=sum(t for _, t in spec) / verify)
        prefix = "sglang:bebop_spec_num_"
    buckets = sorted({m.group(1) for k in d for m in [re.search(r'entropy_le="([^"]+)"', k)] if m},
                     key=lambda x: float("inf") if x == "+Inf" else float(x))
    table = []
    for le in buckets:
        ver = total(d, prefix + "verified_tokens_by_entropy_total", entropy_le=le)
        acc = total(d, prefix + "accepted_tokens_by_entropy_total", entropy_le=le)
        if ver:
            table.append({"entropy_le": le, "verified": ver, "acceptance": acc / ver})
    if table:
        res["acceptance_by_entropy"] = table
        if engine == "sglang":
            ver = sum(r["verified"] for r in table)
            res["acceptance_rate"] = sum(r["acceptance"] * r["verified"] for r in table) / ver
    print(json.dumps(res, indent=1))

asyncio.run(main())
PY
  echo "  $1: $(python -c "import json,sys; r=json.load(open('$OUT/$1.json')); print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != 'acceptance_by_entropy'})")"
}

for state in unpatched patched; do
  if [[ "$state" == patched ]]; then bp "$ENGINE"; else bp "$ENGINE" --revert; fi
  echo "== $ENGINE $state: starting server"
  start_server spec "$state"
  for s in "${SETTINGS[@]}"; do
    read -r t p k <<<"$s"
    run_load "$state-T${t}-p${p}-k${k}" "$t" "$p" "$k"
  done
  stop_server
done
echo "== $ENGINE without speculation"
start_server nospec nospec
read -r t p k <<<"${SETTINGS[1]}"
run_load "nospec-T${t}-p${p}-k${k}" "$t" "$p" "$k"
stop_server

python - "$OUT" <<'PY' | tee "$OUT/summary.md"
import glob, json, os, sys
out = sys.argv[1]
rows = [json.load(open(f)) | {"tag": os.path.basename(f)[:-5]} for f in sorted(glob.glob(f"{out}/*.json"))]
print("| run | tokens/s | mean accepted length | acceptance rate |")
print("|---|---|---|---|")
for r in rows:
    fmt = lambda k: f"{r[k]:.3f}" if k in r else "-"
    print(f"| {r['tag']} | {r['tokens_per_s']:.1f} | {fmt('mean_accepted_length')} | {fmt('acceptance_rate')} |")
PY
