#!/usr/bin/env bash
# GPU end-to-end on an H200 host (no Rust there): the services on the GPU against the CPU
# reference, then issue 4's P3/P4 measurements on a random real-dims DeepSeek-V2 checkpoint.
# Build here: cargo build --release --workspace; carry target/release/{dsv2,dsv2-router,dsv2-expert,
# dsv2-gpu-check,dsv2-cuda-check} (strip --strip-debug them: the carry limit is 64 MiB).
# Output goes to $OUT/gpu-e2e.log. LAYERS (default 2) sets the real-dims model depth.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release}"
OUT_DIR="${OUT:-/tmp/dsv2-gpu-e2e}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu-e2e.log") 2>&1
export DSV2_CACHE_DIR=/tmp/dsv2-cache NCCL_NVLS_ENABLE=0 DSV2_LOG=warn
PY="${PYTHON:-python3}"
LAYERS="${LAYERS:-2}"
fail=0
echo "== $(date -u +%FT%TZ) $(nvidia-smi -L | head -2 | tr '\n' ' ')"

# Starts "$@" (a server taking --listen), waits for DSV2_READY, prints the address.
start() {
  local name=$1; shift
  "$@" --listen 127.0.0.1:0 >"/tmp/$name.out" 2>"/tmp/$name.err" &
  echo $! >>/tmp/dsv2-e2e.pids
  for _ in $(seq 600); do
    if grep -q DSV2_READY "/tmp/$name.out" 2>/dev/null; then awk '/DSV2_READY/{print $2}' "/tmp/$name.out"; return 0; fi
    sleep 0.2
  done
  echo "$name did not start:" >&2; tail -20 "/tmp/$name.err" >&2; return 1
}
stop_all() {
  [ -f /tmp/dsv2-e2e.pids ] && kill $(cat /tmp/dsv2-e2e.pids) 2>/dev/null
  rm -f /tmp/dsv2-e2e.pids /tmp/e0.out /tmp/e1.out /tmp/router.out
  sleep 0.5
}
trap stop_all EXIT
ids_of() { "$PY" -c "import json,sys; print(','.join(map(str, json.load(open('$1'))['cases'][$2]['input_ids'])))"; }
out_ids() { "$PY" -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['output_ids'])"; }

echo "== 1. router + 2 expert shards on cuda:0 vs the CPU reference (greedy, 16 tokens)"
for fx in v2 v2-lite dense2; do
  dir=tests/fixtures/models/$fx
  e0=$(start e0 "$BIN/dsv2-expert" --model-dir "$dir" --device cuda:0 --shard-index 0 --num-shards 2) || { fail=1; continue; }
  e1=$(start e1 "$BIN/dsv2-expert" --model-dir "$dir" --device cuda:0 --shard-index 1 --num-shards 2) || { fail=1; continue; }
  r=$(start router "$BIN/dsv2-router" --model-dir "$dir" --device cuda:0 --shard "http://$e0" --shard "http://$e1") || { fail=1; continue; }
  for c in 0 1 2; do
    ids=$(ids_of "$dir/reference.json" $c)
    cpu=$("$BIN/dsv2" generate --model-dir "$dir" --input-ids "$ids" --max-output-len 16 --ignore-eos --json 2>/dev/null | out_ids)
    gpu=$("$BIN/dsv2" generate --model-dir "$dir" --device cuda:0 --input-ids "$ids" --max-output-len 16 --ignore-eos --json 2>/dev/null | out_ids)
    svc=$("$BIN/dsv2" generate --endpoint "http://$r" --input-ids "$ids" --max-output-len 16 --ignore-eos --json 2>/dev/null | out_ids)
    verdict=$("$PY" - "$cpu" "$gpu" "$svc" <<'PYEOF'
import ast, sys
cpu, gpu, svc = (ast.literal_eval(a) for a in sys.argv[1:4])
def prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
print(f"gpu-service vs cpu: {prefix(svc, cpu)}/16 equal prefix; gpu-service vs gpu-in-process: {prefix(svc, gpu)}/16; gpu-in-process vs cpu: {prefix(gpu, cpu)}/16",
      "FIRST-TOKEN-MISMATCH" if not svc or not cpu or svc[0] != cpu[0] else "")
PYEOF
)
    echo "$fx case$c: $verdict"
    case "$verdict" in *FIRST-TOKEN-MISMATCH*) fail=1;; esac
  done
  stop_all
done

echo "== 1b. sampling on the GPU (sample_f32 in the engine): a seed reproduces its tokens"
for fx in v2 v2-lite; do
  dir=tests/fixtures/models/$fx
  ids=$(ids_of "$dir/reference.json" 0)
  samp() { "$BIN/dsv2" generate --model-dir "$dir" --device cuda:0 --input-ids "$ids" --max-output-len 16 --ignore-eos --temperature 0.8 --top-k 40 --top-p 0.9 --seed "$1" --json 2>/dev/null | out_ids; }
  a=$(samp 3); b=$(samp 3); c=$(samp 4)
  if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "$fx: seed 3 twice equal ($a); seed 4: $c"; else echo "$fx: SAMPLING NOT REPRODUCIBLE: $a vs $b"; fail=1; fi
done

echo "== 2. ceilings (copy bandwidth, cuBLAS) and op checks"
"$BIN/dsv2-gpu-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check.log" 2>&1 || fail=1
# the whole table is in gpu-check.log; here the failures, the summary and every measurement
grep -E "FAIL|^checks:|^device|copy d2d|cuBLAS bf16|P1|P2" "$OUT_DIR/gpu-check.log"
echo "== 2b. the full model on the golden fixtures vs HF and the CPU reference (dsv2-cuda-check)"
"$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check.log" 2>&1 || { echo "dsv2-cuda-check FAILED"; fail=1; }
tail -25 "$OUT_DIR/cuda-check.log"

echo "== 3. P3/P4 on a random real-dims DeepSeek-V2 ($LAYERS layers: layer 0 dense, then MoE)"
t0=$(date +%s)
"$BIN/dsv2" init-random --preset deepseek-v2 --layers "$LAYERS" --threads 8 --out /tmp/rd >/dev/null 2>/tmp/init.err || { tail -5 /tmp/init.err; fail=1; }
echo "init-random: $(( $(date +%s) - t0 )) s, $(du -sh /tmp/rd | cut -f1)"
# The same checkpoint cut to its dense layer 0, so one MoE layer's cost is the difference.
mkdir -p /tmp/rd1 && ln -sf /tmp/rd/*.safetensors /tmp/rd/*.json /tmp/rd1/ 2>/dev/null
rm -f /tmp/rd1/config.json
"$PY" -c "import json; c=json.load(open('/tmp/rd/config.json')); c['num_hidden_layers']=1; json.dump(c, open('/tmp/rd1/config.json','w'))"
# In-process decode of DISTINCT seeded prompts (context 512, batch 1 and 64), each configuration
# beside the roofline of this card; the prompt ids go to the HF script too (--dump-prompts).
# Every number lands in $OUT_DIR/bench-*.json; the table goes to this log.
"$BIN/dsv2" bench --device cuda:0 --model-dir /tmp/rd --batch 1,64 --context 512 --new-tokens 32 --runs 3 \
  --json "$OUT_DIR/bench-$LAYERS-layer.json" --dump-prompts "$OUT_DIR/prompts.txt" 2>/dev/null | sed "s/^/ours $LAYERS-layer: /"
"$BIN/dsv2" bench --device cuda:0 --model-dir /tmp/rd1 --batch 1,64 --context 512 --new-tokens 32 --runs 3 \
  --json "$OUT_DIR/bench-1-layer.json" 2>/dev/null | sed "s/^/ours 1-layer: /"
DSV2_SMALL_EXPERTS=0 "$BIN/dsv2" bench --device cuda:0 --model-dir /tmp/rd --batch 1 --context 512 --new-tokens 32 --runs 3 \
  --json "$OUT_DIR/bench-$LAYERS-layer-permuted.json" 2>/dev/null | sed "s/^/ours $LAYERS-layer, permuted experts (DSV2_SMALL_EXPERTS=0): /"
for b in 1 64; do
  # where a step's time goes (ops timed one by one with the stream synchronised: slower overall)
  DSV2_PROFILE=1 "$BIN/dsv2" bench --device cuda:0 --model-dir /tmp/rd --batch $b --context 512 --new-tokens 16 --probe-steps 0 2>&1 >/dev/null | sed -n '/DSV2_PROFILE/,$p' | sed "s/^/profile batch $b: /"
  "$PY" bench/hf_cpu_decode.py /tmp/rd --device cuda --dtype bfloat16 --batch $b --prompt-file "$OUT_DIR/prompts.txt" --prompt-len 512 --new-tokens 32 --runs 3 2>/dev/null | sed "s/\"output_ids\": \[[^]]*\]//;s/^/hf $LAYERS-layer batch $b: /"
done
echo "gpu-e2e exit status: $fail"
exit $fail
