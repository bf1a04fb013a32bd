#!/usr/bin/env bash
# One-GPU measurements of the decode and MLA issues (19, 20) in one device call:
#   check    dsv2-gpu-check: every kernel against its CPU reference, then the ceilings (copy
#            bandwidth, cuBLAS peak), MLA decode (P1), prefill attention, the expert FFN (P2,
#            P2g) and the routed-expert decode rows (D1..D256) beside their rooflines
#   gemv     dsv2-gpu-check --gemv: the few-row GEMV kernels against the CPU, then each decode
#            projection shape at 1/2/4/8 rows, GEMV vs cuBLAS beside the copy-bandwidth roofline
#   mla      dsv2-gpu-check --mla: the MLA kernels against their CPU reference, then the decode
#            (P1) and prefill attention rows beside their rooflines (MLA_KERNELS: which decode kernels)
#   seesaw, tma, tma-pair  that TMA MLA decode kernel alone (checks, P1), then dsv2-cuda-check with it
#   fp8      the FP8 latent cache (--kv-cache-dtype fp8): dsv2-gpu-check --fp8 (append, gather and
#            decode kernels against the CPU quantizer / reference, then the P1-FP8 rows: fp8 vs
#            bf16 decode at 64 heads x batch 128 and 128 heads x batch 64, ctx 4096), then
#            dsv2-cuda-check --fp8 (fixtures and real-dims models, fp8 cache vs bf16 cache)
#   fp8-bench  in-process `dsv2 bench` at context 4096, batch 64 and 256, bf16 then fp8 cache
#   fp8-served the served rows of `served` (4-layer V2) with --kv-cache-dtype fp8
#   fixtures dsv2-cuda-check: the whole model on the golden fixtures vs HF and the CPU reference,
#            with the small-batch expert kernels on (default) and off (grouped kernels at every size),
#            and with CUDA graphs off (DSV2_CUDA_GRAPHS=0; the real-dims decode rows replay graphs)
#   bench    scripts/gpu-bench.sh: in-process `dsv2 bench` (distinct prompts, batch 1/8/64/256, context
#            512 and 4096) beside the roofline measured in the same process
#   bench-eager  the same with CUDA graphs off (DSV2_CUDA_GRAPHS=0), to compare
#   lite-bench, lite-bench-eager  the same on DeepSeek-V2-Lite (27 layers), graphs on and off
#   served-graphs  the served decode rows alone (4-layer V2)
#   served-vs-bench  in-process `dsv2 bench` and the served router on the same shapes (16-token distinct
#            prompts, NEW_TOKENS new, batch/concurrency 1, 64, 256; SV_PRESET, SV_LAYERS)
#   nsys     per-kernel GPU time of decode (Nsight Systems, kernels inside graphs traced; NSYS_PRESET,
#            NSYS_LAYERS, NSYS_BATCH), the kernels' time a step beside the bench's step time
#   pending  what session 12 built and could not run, also as three sections: `roles` the roles
#            MLA decode kernel (checks, P1, end to end), `dyn` the grouped kernels with the dynamic
#            tile schedule (checks, P2g, prefill), `mla-p1` the other MLA kernels' P1 rows
#   fused    the decode fusions (shared experts in the small-batch expert kernels at one row, gate
#            GEMV + top-k, query rope in the append): fixtures, then batch 1 and 4 decode (4-layer V2,
#            V2-Lite) with and without (DSV2_FUSED_SHARED=0 DSV2_FUSED_GATE=0 DSV2_FUSED_ROPE=0)
#   pdl      PDL (DSV2_PDL=1): the fixtures and the MLA checks with it, then V2-Lite and 4-layer V2
#            batch 1 and 4 with PDL off, on, and on with an earlier tree's dsv2 (BASE_BIN, default
#            $BIN/base; its dsv2 bench must know --block-size, e09032a or later)
#   persistent  the persistent grouped decode tiles (DSV2_GROUPED_DECODE=persistent): grouped checks
#            and D rows, V2-Lite / 4-layer V2 batch 64 and 256 grid vs persistent vs persistent with
#            the fused permutation (DSV2_FUSED_PERMUTE=1), then the MLA
#            default at 64-token blocks (tma-pair) against wgmma
#   beside   the shared experts beside the routed ones (DSV2_SHARED_BESIDE=1, opt-in, session 18,
#            unmeasured when written): the small-expert check rows with the shared gate/up beside,
#            the fixtures with it, then V2-Lite and 4-layer V2 batch 1, 64, 256 at context 512 with
#            it and without, one process each (step / roofline in each)
#   fp8-regs the FP8 decode kernel that converts the codes in registers (DSV2_MLA_FP8_KERNEL=regs,
#            session 19, unmeasured when written): dsv2-gpu-check --fp8 (both FP8 kernels' checks,
#            P1-FP8 rows), then if its rows pass dsv2-cuda-check --fp8 with it, 4-layer V2 batch 64
#            x 4096 with the FP8 cache (regs) against bf16, and ncu on it (NCU_FP8=0 skips)
#   narrow   the narrow decode kernel for few heads (DSV2_MLA_KERNEL=narrow / narrow-rs, session 19):
#            the MLA checks with both forms, the 16-head P1 rows beside wgmma, then with the first
#            form whose rows pass the fixtures and V2-Lite batch 1/64/256 at context 512, and
#            without
#   prefill-persist  the persistent wgmma prefill (DSV2_PREFILL_KERNEL=wgmma-persist, session 19):
#            the MLA checks and PF rows (every prefill tile), the fixtures with it, 4-layer V2
#            prefill 64 x 512 and 1 x 4096 with it and without
#   ab       an A/B of decode switches: kernel checks (AB_CHECKS=0 skips them), then batch 1 and 4
#            decode (V2-Lite, 4-layer V2) with AB_ON (default: the defaults), an earlier tree's
#            dsv2 (BASE_BIN, default $BIN/base), AB_OFF (default: session 14's fusions off); the
#            fixtures with AB_ON
#   ncu-small  Nsight Compute on one gate/up and one down launch of the small-batch expert kernels
#            in a V2-Lite batch-1 decode (real clocks; NCU_KERNELS picks other kernels by regex):
#            throughput, occupancy, stall reasons
#   ncu-step per-kernel GPU time of one decode step (NCU_PRESET/NCU_LAYERS/NCU_BATCH; real clocks
#            and warm caches unless NCU_CLOCK=base / NCU_CACHE=all)
#   ncu-grouped  Nsight Compute on one P2-shaped launch of the warp-specialised grouped expert kernel
#   mla-probes  the tma MLA kernel normally, its math alone and its loads alone (P1 rows)
#   ncu, ncu-stalls, ncu-pipes, ncu-mem  Nsight Compute on an MLA decode kernel (NCU_MLA=wgmma/tma/tma-pair/seesaw; throughputs,
#            why warps wait)
#   served   dsv2-router --device cuda:0 with local experts and random real-dims weights, driven by
#            `dsv2 loadtest` with DISTINCT prompts (MoE cost depends on it): decode at c=1/64/256,
#            prefill of 64 distinct 512-token prompts and time to first token of one 4096-token
#            prompt; on the 4-layer DeepSeek-V2 (and the per-expert cuBLAS loop at c=64 to
#            compare) and on DeepSeek-V2-Lite (27 layers)
#   host-tier  the prefix cache's host tier (issue 15): restore from pinned host memory vs
#            recompute (prefill) of 256..16384-token prefixes, the restored blocks checked against
#            the originals, and the engine with a too-small device cache + host tier against one
#            that keeps everything (`dsv2 bench --host-restore`); 4-layer V2, then V2-Lite (27)
# Build here with scripts/build-gpubin.sh; on the device: BIN=.gpubin bash scripts/gpu-decode.sh.
# Sections run in the order of SECTIONS while the elapsed time stays under BUDGET_S; logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.gpubin}"
OUT_DIR="${OUT:-/tmp/dsv2-gpu-decode}"
BUDGET_S="${BUDGET_S:-540}"
NEW_TOKENS="${NEW_TOKENS:-128}"
mkdir -p "$OUT_DIR"
export DSV2_CACHE_DIR=/tmp/dsv2-cache DSV2_LOG=warn
PY="${PYTHON:-python3}"
PIDFILE=/tmp/dsv2-gd.pids
source scripts/lib/services.sh
trap stop_all EXIT
t0=$(date +%s)
fail=0
# the binaries' commit (scripts/build-gpubin.sh writes it): the device copy's git metadata can
# be stale (session 12 run 1 printed an older commit than the binaries')
echo "== $(date -u +%FT%TZ) binaries of $(cat "$BIN/COMMIT" 2>/dev/null || echo "commit unknown"); $(nvidia-smi -L | head -1)"

over_budget() {
  local used=$(( $(date +%s) - t0 ))
  if [ "$used" -ge "$BUDGET_S" ]; then echo "== SKIPPED $1: $used s of the $BUDGET_S s budget used"; fail=1; return 0; fi
  return 1
}

# distinct PROMPTS LEN NEW FILE: a loadtest data file of PROMPTS GenerateRequests with distinct
# seeded random prompts of LEN ids each.
distinct() {
  "$PY" - "$@" <<'PYEOF'
import json, random, sys
n, length, new, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(n * 1000 + length)
# greedy, as `dsv2 bench` decodes (unset temperature means 1.0: sampling on the device)
reqs = [{"token_ids": {"ids": [rng.randrange(100, 100000) for _ in range(length)]},
         "max_new_tokens": new, "ignore_eos": True, "temperature": 0} for _ in range(n)]
json.dump(reqs, open(path, "w"))
PYEOF
}

# load LABEL ADDR C N DATA: one loadtest (streaming), one summary line.
load() {
  local label=$1 addr=$2 c=$3 n=$4 data=$5
  "$BIN/dsv2" loadtest --endpoint "http://$addr" --call stream -c "$c" -n "$n" --timeout 1200s --data "$data" \
    --json-out "$OUT_DIR/lt.json" >/dev/null 2>"$OUT_DIR/lt.err" || { tail -3 "$OUT_DIR/lt.err"; fail=1; }
  "$PY" - "$label" "$OUT_DIR/lt.json" <<'PYEOF' || echo "$1: no report"
import json, sys
label, path = sys.argv[1], sys.argv[2]
j = json.load(open(path)); d = j["dsv2"]; t = d.get("timeToFirstToken") or {}
ms = lambda v: "%.0f ms" % (v / 1e6) if isinstance(v, (int, float)) else "-"
# decode: first to last token of each stream (what `dsv2 bench`'s decode rows measure); the
# end-to-end tok/s also holds every request's prefill and the gaps between requests
dec = d.get("decode") or {}
dec_s = ("decode %.0f tok/s a stream (%.3f ms a token)" % (dec["tokensPerSecPerStream"], dec["timePerOutputToken"] / 1e6)
         if dec.get("tokensPerSecPerStream") else "no decode figure")
print("%s: %.0f tok/s end to end, %s, %d ok, %d errors, wall %.2f s, TTFT mean %s p50 %s p99 %s" % (
    label, d["tokensPerSec"], dec_s, d["okCount"], d["errorCount"], j["total"] / 1e9,
    ms(t.get("average")), ms(t.get("p50")), ms(t.get("p99"))))
PYEOF
}

# served PRESET LAYERS LABEL [ENV...]: router with local experts on cuda:0, decode and prefill.
served() {
  local preset=$1 layers=$2 label=$3 r
  shift 3
  local dir="/tmp/gd-$preset-$layers"
  mkdir -p "$dir"
  "$BIN/dsv2" init-random --preset "$preset" --layers "$layers" --config-only --out "$dir" --seed 1 >/dev/null 2>&1
  local t1=$(date +%s)
  r=$(start router env "$@" "$BIN/dsv2-router" --model-dir "$dir" --random-weights 1 --device cuda:0 \
    --max-running 256 --max-queue 2048 --kv-cache-blocks 16384 --request-timeout-s 1200 ${ROUTER_ARGS:-}) \
    || { fail=1; stop_all; return; }
  echo "$label: router up in $(( $(date +%s) - t1 )) s; $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) used"
  distinct 8 16 "$NEW_TOKENS" /tmp/gd-c1.json
  distinct 128 16 "$NEW_TOKENS" /tmp/gd-c64.json
  distinct 512 16 "$NEW_TOKENS" /tmp/gd-c256.json
  # one untimed request first: the router's first request pays one-off costs (graph capture of
  # the decode shapes, allocator growth; session 12 run 1: TTFT p99 80 ms against p50 6 ms), which
  # at c=1 over a few requests would count against served throughput
  "$BIN/dsv2" loadtest --endpoint "http://$r" --call stream -c 1 -n 1 --timeout 600s --data /tmp/gd-c1.json \
    >/dev/null 2>&1 || true
  if [ "${PREFILL_ONLY:-}" != 1 ]; then
    load "$label decode c=1 (8 distinct 16-token prompts, $NEW_TOKENS new)" "$r" 1 8 /tmp/gd-c1.json
    load "$label decode c=64 (128 distinct prompts)" "$r" 64 128 /tmp/gd-c64.json
  fi
  if [ "${DECODE_ONLY:-}" = 1 ] && [ "${DECODE_256:-}" = 1 ]; then
    load "$label decode c=256 (512 distinct prompts)" "$r" 256 512 /tmp/gd-c256.json
  fi
  if [ "${DECODE_ONLY:-}" != 1 ]; then
    [ "${PREFILL_ONLY:-}" = 1 ] || load "$label decode c=256 (512 distinct prompts)" "$r" 256 512 /tmp/gd-c256.json
    distinct 64 512 1 /tmp/gd-p512.json
    load "$label prefill 64 distinct 512-token prompts, c=64, 1 new token" "$r" 64 64 /tmp/gd-p512.json
    distinct 2 4096 1 /tmp/gd-p4096.json
    load "$label prefill one 4096-token prompt at a time (2 prompts), 1 new token" "$r" 1 2 /tmp/gd-p4096.json
  fi
  stop_all
}

for sec in ${SECTIONS:-check fixtures served lite profile}; do
  over_budget "$sec" && continue
  echo "== $sec (at $(( $(date +%s) - t0 )) s)"
  case "$sec" in
    check)
      timeout -k 5 300 "$BIN/dsv2-gpu-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|^device|copy d2d|cuBLAS bf16|^P[0-9]|^D[0-9]|prefill|grouped" "$OUT_DIR/gpu-check.log" | grep -v " ok " ;;
    ncu)
      # Nsight Compute on one timed launch of an MLA decode kernel (NCU_MLA: tma, wgmma, seesaw;
      # default wgmma) at batch 64 x ctx 4096 x 128 heads, the first P1 row: --mla with that
      # kernel alone runs its 11 check cases first, then the row's 3 warm-ups
      k=${NCU_MLA:-wgmma}
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout -k 5 240 "$NCU" -k "regex:mla_decode_${k//-/_}_bf16" --launch-skip 14 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        "$BIN/dsv2-gpu-check" --mla --mla-kernels "$k" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/ncu-mla-$k.log" 2>&1 || { echo "ncu FAILED"; fail=1; }
      grep -vE "^(P1|P2|checks|device|copy|cuBLAS|prefill|==PROF==)" "$OUT_DIR/ncu-mla-$k.log" | grep -E "Throughput|Duration|Stall|Warp Cycles|Issued|Eligible|Active|Hit Rate|Bandwidth|Mem Pipes|Registers|Shared Memory|Occupancy|L1|L2|DRAM|Busy|Compute|Pipe" | head -60 ;;
    mla-probes)
      # the tma kernel normally, then its math alone and its loads alone (DSV2_MLA_PROBE=1 / 2:
      # the outputs are wrong, so those runs' check rows FAIL by design): P1 rows only. Per tile
      # and CTA, normal ~ (load time + math) / 2 with two tile buffers (bench/RESULTS.md session 10)
      for p in 0 1 2; do
        echo "-- DSV2_MLA_PROBE=$p"
        DSV2_MLA_PROBE=$p timeout -k 5 120 "$BIN/dsv2-gpu-check" --mla --mla-kernels tma --cache-dir /tmp/dsv2-cubin \
          >"$OUT_DIR/gpu-check-probe$p.log" 2>&1
        grep -E "^P1 |rror|trap" "$OUT_DIR/gpu-check-probe$p.log" | head -8
      done ;;
    ncu-mem)
      # where one MLA decode launch's loads wait: L1/L2/DRAM tables (NCU_MLA as for ncu)
      k=${NCU_MLA:-wgmma}
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout -k 5 240 "$NCU" -k "regex:mla_decode_${k//-/_}_bf16" --launch-skip 14 --launch-count 1 \
        --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SpeedOfLight \
        "$BIN/dsv2-gpu-check" --mla --mla-kernels "$k" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/ncu-mem-$k.log" 2>&1 || { echo "ncu FAILED"; fail=1; }
      sed -n '/Section: Memory Workload Analysis Tables/,$p' "$OUT_DIR/ncu-mem-$k.log" | head -80 ;;
    ncu-pipes)
      # how busy the tensor pipe (wgmma) and shared memory are in one MLA decode launch (NCU_MLA as
      # for ncu; batch 64 x ctx 4096 x 128 heads)
      k=${NCU_MLA:-wgmma}
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout -k 5 240 "$NCU" -k "regex:mla_decode_${k//-/_}_bf16" --launch-skip 14 --launch-count 1 \
        --metrics gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,sm__cycles_active.avg,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,smsp__warp_issue_stalled_membar_per_warp_active.pct,smsp__warp_issue_stalled_sleeping_per_warp_active.pct \
        "$BIN/dsv2-gpu-check" --mla --mla-kernels "$k" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/ncu-pipes-$k.log" 2>&1 || { echo "ncu FAILED"; fail=1; }
      grep -E "gmma|cycles|wavefronts|stalled|duration|inst_executed|ERR|rror" "$OUT_DIR/ncu-pipes-$k.log" | grep -v "^P1" | head -20 ;;
    ncu-stalls)
      # why the MLA decode kernel's warps wait (batch 64 x ctx 4096 x 128 heads, one launch; NCU_MLA
      # as for ncu)
      k=${NCU_MLA:-wgmma}
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout -k 5 240 "$NCU" -k "regex:mla_decode_${k//-/_}_bf16" --launch-skip 14 --launch-count 1 \
        --section WarpStateStats --section SpeedOfLight --page raw --csv \
        "$BIN/dsv2-gpu-check" --mla --mla-kernels "$k" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/ncu-stalls-$k.csv" 2>&1 || { echo "ncu FAILED"; fail=1; }
      "$PY" - "$OUT_DIR/ncu-stalls-$k.csv" <<'PYEOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if len(rows) < 3: print("no ncu rows"); sys.exit()
head, units, vals = rows[0], rows[1], rows[2]
for h, u, v in zip(head, units, vals):
    if ("stall" in h and "ratio" in h) or "dram__throughput" in h or "gpu__time_duration" in h:
        try:
            if float(v.replace(",", "")) < 0.05: continue
        except ValueError: continue
        print("%-90s %10s %s" % (h, v, u))
PYEOF
      ;;
    nsys)
      # per-kernel GPU time of decode (graphs on; kernels inside graphs traced one by one) at
      # NSYS_PRESET/NSYS_LAYERS (default 4-layer V2), batch NSYS_BATCH (default 1): the kernels'
      # summed time per step against the bench's step time says how much is gaps between kernels
      NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
      preset=${NSYS_PRESET:-deepseek-v2}; layers=${NSYS_LAYERS:-4}; nb=${NSYS_BATCH:-1}
      dir=/tmp/gd-$preset-$layers
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset "$preset" --layers "$layers" --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      if [ -z "$NSYS" ]; then echo "no nsys on this machine"; else
        timeout -k 5 240 "$NSYS" profile -o /tmp/b1 --force-overwrite true --cuda-graph-trace=node --trace=cuda \
          "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 --batch "$nb" --context 512 \
          --new-tokens 64 --runs 1 >"$OUT_DIR/nsys-bench-$preset.log" 2>&1 || { echo "nsys FAILED"; tail -5 "$OUT_DIR/nsys-bench-$preset.log"; fail=1; }
        grep -E "^ +$nb +512|step|tok/s" "$OUT_DIR/nsys-bench-$preset.log" | head -6
        "$NSYS" stats --report cuda_gpu_kern_sum --format csv /tmp/b1.nsys-rep 2>/dev/null >/tmp/kern.csv
        cp /tmp/kern.csv "$OUT_DIR/nsys-kern-$preset-b$nb.csv"
        "$PY" - /tmp/kern.csv "$layers" <<'PYEOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 8]
h = rows[0]; rows = rows[1:]
i_t, i_n, i_avg, i_name = h.index("Total Time (ns)"), h.index("Instances"), h.index("Avg (ns)"), h.index("Name")
# decode kernels run once per layer per step: many instances; the ceiling probes run 10-20 times
rows = [r for r in rows if int(r[i_n]) >= 60]
tot = sum(int(r[i_t]) for r in rows)
steps = max(int(r[i_n]) for r in rows if "embedding" in r[i_name]) if any("embedding" in r[i_name] for r in rows) else 0
print("kernels with >= 60 launches: %.2f ms in total; %d embedding launches (steps incl. prefill): %.1f us of kernel time a step, %d launches a step"
      % (tot / 1e6, steps, tot / 1e3 / max(steps, 1), sum(int(r[i_n]) for r in rows) // max(steps, 1)))
for r in sorted(rows, key=lambda r: -int(r[i_t]))[:28]:
    print("%8.3f ms %6s x %8.1f us  %s" % (int(r[i_t]) / 1e6, r[i_n], float(r[i_avg]) / 1e3, r[i_name][:110]))
PYEOF
      fi ;;
    pending|roles|dyn|mla-p1)
      # what session 12 built and could not run (bench/RESULTS.md, end of session 12), in three
      # parts that run as their own sections too (`pending` = all three): `roles` the roles
      # MLA decode kernel (mla_roles.cu) alone first, in its own process with a short time-out
      # (its first version hung in setmaxnreg; this one traps on misaligned shared memory),
      # then end to end and its probes; `dyn` the grouped kernels' quick checks and P2g with the
      # dynamic tile schedule (Ws128Dyn) beside Ws128 and the pair, then prefill of 64 x 512
      # tokens with Ws128 and Ws128Dyn; `mla-p1` the other MLA kernels' P1 rows, which session
      # 12's hang cost
      if [ "$sec" = pending ] || [ "$sec" = roles ]; then
        timeout -k 5 70 "$BIN/dsv2-gpu-check" --mla --mla-kernels roles --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-roles.log" 2>&1
        echo "roles exit $?"
        grep -E "FAIL|^checks:|^P1 |rror|trap" "$OUT_DIR/gpu-check-roles.log" | cut -c1-220
        if grep -q "^checks: .* 0 FAIL" "$OUT_DIR/gpu-check-roles.log"; then
          DSV2_MLA_KERNEL=roles timeout -k 5 60 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-roles.log" 2>&1 || { echo "dsv2-cuda-check (roles) FAILED"; fail=1; }
          tail -3 "$OUT_DIR/cuda-check-roles.log"
          # where its time goes: the math alone, the loads alone (P1 rows; wrong outputs)
          for p in 1 2; do
            echo "-- roles, DSV2_MLA_PROBE=$p"
            DSV2_MLA_PROBE=$p timeout -k 5 60 "$BIN/dsv2-gpu-check" --mla --no-check --mla-kernels roles --cache-dir /tmp/dsv2-cubin \
              >"$OUT_DIR/gpu-check-roles-probe$p.log" 2>&1
            grep -E "^P1 .*(batch 64 ctx 4096 heads 128|batch 8 ctx 32768)|rror|trap" "$OUT_DIR/gpu-check-roles-probe$p.log" | cut -c1-220
          done
        fi
      fi
      if [ "$sec" = pending ] || [ "$sec" = dyn ]; then
        timeout -k 5 120 "$BIN/dsv2-gpu-check" --grouped --quick --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-grouped.log" 2>&1 || fail=1
        grep -E "FAIL|^checks:|copy d2d|cuBLAS bf16|^P2|^D[0-9]|rror|trap" "$OUT_DIR/gpu-check-grouped.log" | cut -c1-220
        dir=/tmp/gd-deepseek-v2-4
        mkdir -p "$dir"
        "$BIN/dsv2" init-random --preset deepseek-v2 --layers 4 --config-only --out "$dir" --seed 1 >/dev/null 2>&1
        for ws in 1 dyn; do
          echo "-- prefill 64 x 512, DSV2_GROUPED_WS=$ws"
          DSV2_GROUPED_WS=$ws timeout -k 5 120 "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 \
            --batch 64 --context 512 --new-tokens 2 2>"$OUT_DIR/bench-prefill-$ws.err" | sed -n '/^prefill/,/^$/p' || { echo "bench FAILED"; fail=1; }
        done
      fi
      if [ "$sec" = pending ] || [ "$sec" = mla-p1 ]; then
        timeout -k 5 120 "$BIN/dsv2-gpu-check" --mla --no-check --mla-kernels wgmma,seesaw,tma,tma-pair --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-mla-p1.log" 2>&1 || fail=1
        grep -E "^P1 |rror|trap" "$OUT_DIR/gpu-check-mla-p1.log" | cut -c1-220
      fi ;;
    fused)
      # the decode fusions of session 13 (on by default): the shared experts inside the
      # small-batch expert kernels (one row only), the gate GEMV + top-k in one launch, the
      # queries' rope in the latent append: the fixtures with them, then batch 1 and 4 decode of
      # the 4-layer V2 and V2-Lite (27 layers) with all three on, then off; step / roofline in
      # the same process
      timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-fused.log" 2>&1 || { echo "dsv2-cuda-check (fusions on) FAILED"; fail=1; }
      tail -3 "$OUT_DIR/cuda-check-fused.log"
      # V2-Lite first (its batch-1 goal is the farthest), each run only while the budget lasts
      for run in "deepseek-v2-lite 27 1" "deepseek-v2-lite 27 0" "deepseek-v2 4 1" "deepseek-v2 4 0"; do
        set -- $run
        over_budget "fused bench $run" && break
        echo "-- $1 ($2 layers), DSV2_FUSED_SHARED=$3 DSV2_FUSED_GATE=$3 DSV2_FUSED_ROPE=$3"
        DSV2_FUSED_SHARED=$3 DSV2_FUSED_GATE=$3 DSV2_FUSED_ROPE=$3 PRESET=$1 LAYERS=$2 BATCHES=1,4 CONTEXTS=512 NEW_TOKENS=32 LIMIT_S=90 \
          OUT=/tmp/gd-fused bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
      done ;;
    pdl)
      DSV2_PDL=1 timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-pdl.log" 2>&1 || { echo "dsv2-cuda-check (DSV2_PDL=1) FAILED"; fail=1; }
      tail -2 "$OUT_DIR/cuda-check-pdl.log"
      DSV2_PDL=1 timeout -k 5 150 "$BIN/dsv2-gpu-check" --mla --mla-kernels wgmma --no-bench --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-pdl.log" 2>&1 || fail=1
      echo "-- dsv2-gpu-check --mla (DSV2_PDL=1): $(grep -E '^checks:' "$OUT_DIR/gpu-check-pdl.log" | tail -1)"
      base=${BASE_BIN:-$BIN/base}
      for model in "deepseek-v2-lite 27" "deepseek-v2 4"; do
        set -- $model
        for run in "off $BIN DSV2_PDL=0" "on $BIN DSV2_PDL=1" "base $base DSV2_PDL=1"; do
          over_budget "pdl $1 $run" && break
          set -- $1 $2 $run
          [ -x "$4/dsv2" ] || { echo "-- $1 $3: no $4/dsv2, skipped"; continue; }
          echo "-- $1 ($2 layers), PDL $3 ($5): binaries of $(cat "$4/COMMIT" 2>/dev/null || echo unknown)"
          env "$5" BIN="$4" PRESET=$1 LAYERS=$2 BATCHES=1,4 CONTEXTS=512 NEW_TOKENS=32 LIMIT_S=90 \
            OUT=/tmp/gd-pdl bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
          set -- $1 $2
        done
      done ;;
    persistent)
      # the persistent decode tiles (DSV2_GROUPED_DECODE=persistent, session 17, unmeasured when
      # written): the grouped checks (P16/P32 rows at awkward sizes and real dims) with the D rows
      # (grid vs persistent tile, V2 dims), then V2-Lite and 4-layer V2 decode at batch 64 and 256,
      # context 512, grid then persistent; last the MLA default at 64-token blocks (tma-pair for
      # 128 heads) against wgmma, 4-layer V2 batch 64 x 4096
      timeout -k 5 150 "$BIN/dsv2-gpu-check" --grouped --quick --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-grouped.log" 2>&1 || fail=1
      echo "-- dsv2-gpu-check --grouped --quick: $(grep -E '^checks:' "$OUT_DIR/gpu-check-grouped.log" | tail -1)"
      grep -E "FAIL" "$OUT_DIR/gpu-check-grouped.log" | head -8
      grep -E "^D[0-9]" "$OUT_DIR/gpu-check-grouped.log" | sed 's/; per-expert.*//'
      # the whole model on the fixtures with both switches on
      DSV2_GROUPED_DECODE=persistent DSV2_FUSED_PERMUTE=1 timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin \
        >"$OUT_DIR/cuda-check-persistent.log" 2>&1 || { echo "dsv2-cuda-check (persistent, fused permute) FAILED"; fail=1; }
      tail -2 "$OUT_DIR/cuda-check-persistent.log"
      for model in "deepseek-v2-lite 27" "deepseek-v2 4"; do
        set -- $model
        for mode in grid persistent "persistent DSV2_FUSED_PERMUTE=1"; do
          over_budget "persistent $1 $mode" && break
          echo "-- $1 ($2 layers), DSV2_GROUPED_DECODE=$mode"
          env DSV2_GROUPED_DECODE=$mode BIN="$BIN" PRESET=$1 LAYERS=$2 BATCHES=64,256 CONTEXTS=512 NEW_TOKENS=32 LIMIT_S=120 \
            OUT=/tmp/gd-persist bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
        done
      done
      for k in default wgmma; do
        over_budget "block 64 $k" && break
        echo "-- deepseek-v2 (4 layers) b64 x 4096, 64-token blocks, MLA kernel: $k"
        env $( [ $k = wgmma ] && echo DSV2_MLA_KERNEL=wgmma ) BLOCK_SIZE=64 BIN="$BIN" PRESET=deepseek-v2 LAYERS=4 BATCHES=64 \
          CONTEXTS=4096 NEW_TOKENS=32 LIMIT_S=90 OUT=/tmp/gd-b64 bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
      done ;;
    beside)
      # the shared experts on the beside stream (session 18): correctness first (the check rows
      # of the small-expert kernels with their shared gate/up beside, the whole model on the
      # fixtures), then the decode step with and without, V2-Lite then 4-layer V2
      timeout -k 5 150 "$BIN/dsv2-gpu-check" --grouped --quick --no-bench --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-beside.log" 2>&1 || fail=1
      echo "-- dsv2-gpu-check --grouped --quick --no-bench: $(grep -E '^checks:' "$OUT_DIR/gpu-check-beside.log" | tail -1); $(grep -c 'gate/up beside' "$OUT_DIR/gpu-check-beside.log") beside rows"
      grep -E "FAIL|rror|trap" "$OUT_DIR/gpu-check-beside.log" | grep -v "^checks:" | cut -c1-200 | head -10
      DSV2_SHARED_BESIDE=1 timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin \
        >"$OUT_DIR/cuda-check-beside.log" 2>&1 || { echo "dsv2-cuda-check (DSV2_SHARED_BESIDE=1) FAILED"; fail=1; }
      tail -2 "$OUT_DIR/cuda-check-beside.log"
      for model in "deepseek-v2-lite 27" "deepseek-v2 4"; do
        set -- $model
        for mode in 1 0; do
          over_budget "beside $1 $mode" && break
          echo "-- $1 ($2 layers), DSV2_SHARED_BESIDE=$mode"
          env DSV2_SHARED_BESIDE=$mode BIN="$BIN" PRESET=$1 LAYERS=$2 BATCHES=1,64,256 CONTEXTS=512 NEW_TOKENS=32 LIMIT_S=120 \
            OUT=/tmp/gd-beside bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
        done
      done ;;
    fp8-regs)
      timeout -k 5 150 "$BIN/dsv2-gpu-check" --fp8 --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-fp8-regs.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|rror|trap|copy d2d|cuBLAS bf16|^P1-FP8" "$OUT_DIR/gpu-check-fp8-regs.log" | cut -c1-400 | head -24
      if grep -q "mla_decode_fp8_regs.*PASS" "$OUT_DIR/gpu-check-fp8-regs.log" && ! grep -q "mla_decode_fp8_regs.*FAIL" "$OUT_DIR/gpu-check-fp8-regs.log"; then
        DSV2_MLA_FP8_KERNEL=regs timeout -k 5 200 "$BIN/dsv2-cuda-check" --fp8 --cache-dir /tmp/dsv2-cubin \
          >"$OUT_DIR/cuda-check-fp8-regs.log" 2>&1 || { echo "dsv2-cuda-check --fp8 (regs) FAILED"; fail=1; }
        tail -8 "$OUT_DIR/cuda-check-fp8-regs.log"
        for mode in "fp8 regs" "bf16 wgmma"; do
          set -- $mode
          over_budget "fp8-regs bench $1" && break
          echo "-- 4-layer V2, batch 64 x 4096, --kv-cache-dtype $1"
          env DSV2_KV_CACHE_DTYPE=$1 DSV2_MLA_FP8_KERNEL=$2 BIN="$BIN" PRESET=deepseek-v2 LAYERS=4 BATCHES=64 CONTEXTS=4096 \
            NEW_TOKENS=16 LIMIT_S=150 OUT=/tmp/gd-fp8-regs bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
        done
        if [ "${NCU_FP8:-1}" = 1 ] && ! over_budget "fp8-regs ncu"; then
          timeout -k 5 120 ncu --kernel-name regex:mla_decode_fp8_regs --launch-count 1 --section SpeedOfLight \
            --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            "$BIN/dsv2-gpu-check" --fp8 --no-check --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/ncu-fp8-regs.log" 2>&1
          grep -E "Duration|Throughput|Stall|Issued Warp|Eligible|Active Warps|Hit Rate|Mem Busy|Max Bandwidth" "$OUT_DIR/ncu-fp8-regs.log" | head -40
        fi
      else
        echo "fp8-regs: the regs kernel's check rows did not all pass; nothing else run"
      fi ;;
    narrow)
      timeout -k 5 200 "$BIN/dsv2-gpu-check" --mla --mla-kernels wgmma,narrow,narrow-rs --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-narrow.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|rror|trap|copy d2d|cuBLAS bf16|P1 .*heads 16" "$OUT_DIR/gpu-check-narrow.log" | cut -c1-300 | head -24
      # the form to run end to end: the shared-memory one if its rows pass, else the register one
      nk=""
      for k in narrow narrow_rs; do
        if grep -q "mla_decode_${k}_bf16.*PASS" "$OUT_DIR/gpu-check-narrow.log" && ! grep -q "mla_decode_${k}_bf16.*FAIL" "$OUT_DIR/gpu-check-narrow.log"; then nk=${k/_/-}; break; fi
      done
      if [ -n "$nk" ]; then
        echo "-- narrow form for the fixtures and benches: $nk"
        DSV2_MLA_KERNEL=$nk timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin \
          >"$OUT_DIR/cuda-check-narrow.log" 2>&1 || { echo "dsv2-cuda-check ($nk) FAILED"; fail=1; }
        tail -2 "$OUT_DIR/cuda-check-narrow.log"
        for k in $nk wgmma; do
          over_budget "narrow bench $k" && break
          echo "-- V2-Lite 27 layers, DSV2_MLA_KERNEL=$k"
          env DSV2_MLA_KERNEL=$k BIN="$BIN" PRESET=deepseek-v2-lite LAYERS=27 BATCHES=1,64,256 CONTEXTS=512 NEW_TOKENS=32 \
            LIMIT_S=120 OUT=/tmp/gd-narrow bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
        done
      else
        echo "narrow: neither form's check rows all passed; nothing else run"
      fi ;;
    prefill-persist)
      timeout -k 5 200 "$BIN/dsv2-gpu-check" --mla --mla-kernels wgmma --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-pf.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|rror|trap|copy d2d|cuBLAS bf16|^PF" "$OUT_DIR/gpu-check-pf.log" | cut -c1-300 | head -24
      if grep -q "mla_prefill_wgmma_persist_bf16.*PASS\|mla_prefill_wgmma_persist_bf16.* ok" "$OUT_DIR/gpu-check-pf.log" && ! grep -q "mla_prefill_wgmma_persist_bf16.*FAIL" "$OUT_DIR/gpu-check-pf.log"; then
        DSV2_PREFILL_KERNEL=wgmma-persist timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin \
          >"$OUT_DIR/cuda-check-pf.log" 2>&1 || { echo "dsv2-cuda-check (wgmma-persist) FAILED"; fail=1; }
        tail -2 "$OUT_DIR/cuda-check-pf.log"
        for shape in "64 512" "1 4096"; do
          set -- $shape
          for k in wgmma-persist wgmma; do
            over_budget "prefill-persist $1 x $2 $k" && break 2
            echo "-- 4-layer V2 prefill $1 x $2, DSV2_PREFILL_KERNEL=$k"
            env DSV2_PREFILL_KERNEL=$k BIN="$BIN" PRESET=deepseek-v2 LAYERS=4 BATCHES=$1 CONTEXTS=$2 NEW_TOKENS=8 \
              LIMIT_S=150 OUT=/tmp/gd-pf bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^prefill/,/^$/p'
          done
        done
      else
        echo "prefill-persist: the persistent kernel's check rows did not all pass; nothing else run"
      fi ;;
    ab)
      # an A/B of decode switches: this tree's binaries with AB_ON (default: nothing, the
      # defaults), with AB_OFF (default: session 14's fusions off, DSV2_SMALL_DOWN=rows
      # DSV2_FUSED_UV=0 DSV2_FUSED_Q_KV_A=0), and an earlier tree's dsv2 (BASE_BIN, default
      # $BIN/base, with its COMMIT file). Ordered for a short budget: the kernel checks (GEMV rows,
      # the default MLA kernel's rows, the small-expert rows), V2-Lite batch 1/4 on / base / off,
      # the fixtures with AB_ON, then the 4-layer V2; every bench a process of its own (step /
      # roofline in each)
      base=${BASE_BIN:-$BIN/base}
      on=${AB_ON:-}
      off=${AB_OFF:-DSV2_SMALL_DOWN=rows DSV2_FUSED_UV=0 DSV2_FUSED_Q_KV_A=0}
      if [ "${AB_CHECKS:-1}" = 1 ]; then
        for what in "--gemv" "--mla --mla-kernels wgmma" "--grouped --quick"; do
          env $on timeout -k 5 150 "$BIN/dsv2-gpu-check" $what --no-bench --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-ab.log" 2>&1 || fail=1
          echo "-- dsv2-gpu-check $what --no-bench: $(grep -E '^checks:' "$OUT_DIR/gpu-check-ab.log" | tail -1)"
          grep -E "FAIL|rror|trap" "$OUT_DIR/gpu-check-ab.log" | grep -v "^checks:" | cut -c1-200 | head -20
        done
      fi
      for run in "deepseek-v2-lite 27 on" "deepseek-v2-lite 27 base" "deepseek-v2-lite 27 off" fixtures \
        "deepseek-v2 4 on" "deepseek-v2 4 base" "deepseek-v2 4 off"; do
        over_budget "ab $run" && break
        if [ "$run" = fixtures ]; then
          env $on timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-ab.log" 2>&1 || { echo "dsv2-cuda-check (${on:-defaults}) FAILED"; fail=1; }
          tail -3 "$OUT_DIR/cuda-check-ab.log"
          continue
        fi
        set -- $run
        b=$BIN vars=
        if [ "$3" = base ]; then
          [ -x "$base/dsv2" ] || { echo "-- $1 base: no $base/dsv2, skipped"; continue; }
          b=$base
        fi
        [ "$3" = on ] && vars=$on
        [ "$3" = off ] && vars=$off
        echo "-- $1 ($2 layers), $3 ${vars:+($vars) }: binaries of $(cat "$b/COMMIT" 2>/dev/null || echo unknown)"
        env $vars BIN=$b PRESET=$1 LAYERS=$2 BATCHES=${AB_BATCHES:-1,4} CONTEXTS=512 NEW_TOKENS=32 LIMIT_S=90 \
          OUT=/tmp/gd-ab bash scripts/gpu-bench.sh 2>&1 | sed -n '/^ceilings/p;/FAILED/p;/^decode, per step/,/^$/p'
      done ;;
    ncu-grouped)
      # Nsight Compute on one P2-shaped launch of the warp-specialised grouped gate/up kernel
      # (8192 tokens x top-6 over 160 experts, V2 dims): --grouped --no-check, so the first
      # launches are P2's; skip the 2 warm-ups
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout -k 5 240 "$NCU" -k "regex:${NCU_GROUPED:-moe_grouped_gate_up_ws}" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
        --section WarpStateStats --section LaunchStats --section Occupancy \
        --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_active.avg,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_sleeping_per_warp_active.pct \
        "$BIN/dsv2-gpu-check" --grouped --no-check --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/ncu-grouped.log" 2>&1 || { echo "ncu FAILED"; fail=1; }
      grep -E "Duration|Throughput|Hit Rate|Bandwidth|gmma|stalled|Warp Cycles|Eligible|Registers|Shared Memory|Busy|Block Size|Grid Size|Waves" "$OUT_DIR/ncu-grouped.log" | grep -v "^P2" | head -50 ;;
    ncu-small)
      # Nsight Compute on the small-batch expert kernels inside a V2-Lite batch-1 decode
      # (NCU_PRESET/NCU_LAYERS/NCU_BATCH as for ncu-step): one gate/up and one down launch of the
      # timed steps, real clocks, with throughput, occupancy, and why warps wait (NCU_COUNT launches
      # after NCU_SKIP_SMALL matching ones)
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      preset=${NCU_PRESET:-deepseek-v2-lite}; layers=${NCU_LAYERS:-27}
      dir=/tmp/gd-$preset-$layers
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset "$preset" --layers "$layers" --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      DSV2_CUDA_GRAPHS=0 timeout -k 5 240 "$NCU" -k "regex:${NCU_KERNELS:-moe_small}" --launch-skip "${NCU_SKIP_SMALL:-300}" --launch-count "${NCU_COUNT:-2}" \
        --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section LaunchStats --section SchedulerStats \
        --metrics smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_drain_per_warp_active.pct,smsp__warp_issue_stalled_no_instruction_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
        "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 --batch "${NCU_BATCH:-1}" --context 512 \
        --new-tokens 64 --runs 1 >"$OUT_DIR/ncu-small.log" 2>&1 || { echo "ncu FAILED"; tail -5 "$OUT_DIR/ncu-small.log"; fail=1; }
      grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Eligible Warps|Issued Warp|No Eligible|Waves Per SM|Grid Size|L2 Hit|Mem Busy|Max Bandwidth" "$OUT_DIR/ncu-small.log" | head -60
      grep -E "stalled|dram__bytes|warps_active" "$OUT_DIR/ncu-small.log" | head -24 ;;
    ncu-step)
      # GPU time of every kernel of one decode step (Nsight Compute times each launch alone; graphs
      # off so that launches are counted one by one): NCU_PRESET/NCU_LAYERS, batch NCU_BATCH
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      preset=${NCU_PRESET:-deepseek-v2-lite}; layers=${NCU_LAYERS:-27}
      # --random-weights draws every tensor on the device, one launch each: V2-Lite's 27 layers x
      # 64 experts make ~6,000 launches before the prompt, so its decode steps start far later
      if [ -z "${NCU_SKIP:-}" ]; then
        case $preset in deepseek-v2-lite) NCU_SKIP=20000 ;; *) NCU_SKIP=3000 ;; esac
      fi
      dir=/tmp/gd-$preset-$layers
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset "$preset" --layers "$layers" --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      # clocks and caches as in a real run (NCU_CLOCK=base, NCU_CACHE=all: ncu's defaults, which
      # lock the base clock and flush the caches before each launch; session 15's first table
      # was taken so, 3.59 ms of kernels against a 2.91 ms step)
      DSV2_CUDA_GRAPHS=0 timeout -k 5 300 "$NCU" --launch-skip "$NCU_SKIP" --launch-count "${NCU_COUNT:-1300}" \
        --clock-control "${NCU_CLOCK:-none}" --cache-control "${NCU_CACHE:-none}" \
        --metrics gpu__time_duration.sum --csv --print-units base \
        "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 --batch "${NCU_BATCH:-1}" --context 512 \
        --new-tokens 64 --runs 1 >/tmp/ncu-step.csv 2>/tmp/ncu-step.err || { echo "ncu FAILED"; tail -3 /tmp/ncu-step.err; fail=1; }
      "$PY" - /tmp/ncu-step.csv "$preset $layers layers, batch ${NCU_BATCH:-1}" <<'PYEOF'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print("no ncu rows"); sys.exit()
h = rows[0]; rows = rows[1:]
k, v = h.index("Kernel Name"), h.index("Metric Value")
seq = [(r[k], float(r[v].replace(",", ""))) for r in rows if r[h.index("Metric Name")] == "gpu__time_duration.sum"]
emb = [i for i, (n, _) in enumerate(seq) if "embedding" in n]
if len(emb) < 2:
    # say what was seen, so the next run can pick NCU_SKIP / NCU_COUNT (or the step's first kernel)
    names = collections.Counter(n.split("(")[0][:60] for n, _ in seq)
    print("no whole step among %d launches (%d embedding launches); most launched:" % (len(seq), len(emb)))
    for n, c in names.most_common(8): print("  %5d x %s" % (c, n))
    sys.exit()
step = seq[emb[0]:emb[1]]
tot = sum(d for _, d in step)
print("%s: one decode step = %d kernels, %.1f us of kernel time (each launch timed alone)" % (sys.argv[2], len(step), tot / 1e3))
agg = collections.defaultdict(lambda: [0, 0.0])
for n, d in step:
    a = agg[n.split("(")[0][:70]]; a[0] += 1; a[1] += d
for n, (c, d) in sorted(agg.items(), key=lambda x: -x[1][1])[:24]:
    print("%9.1f us %5.1f%% %4d x %7.2f us  %s" % (d / 1e3, 100 * d / tot, c, d / c / 1e3, n))
PYEOF
      ;;
    served-graphs)
      DECODE_ONLY=1 served deepseek-v2 4 "4-layer V2 (CUDA graphs)" ;;
    served-vs-bench)
      # issue 19's "served equals in-process": the same shapes both ways on SV_PRESET/SV_LAYERS
      # (default 4-layer V2): in-process `dsv2 bench` at batch 1/64/256 over distinct 16-token
      # prompts with NEW_TOKENS new, then the router (local experts, graphs on) under `dsv2
      # loadtest` at c=1/64/256 with distinct 16-token prompts and NEW_TOKENS new
      preset=${SV_PRESET:-deepseek-v2}; layers=${SV_LAYERS:-4}
      dir=/tmp/gd-$preset-$layers
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset "$preset" --layers "$layers" --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      timeout -k 5 200 "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 --batch 1,64,256 \
        --context 16 --new-tokens "$NEW_TOKENS" --json "$OUT_DIR/bench-served-shapes-$preset.json" \
        2>"$OUT_DIR/bench-served-shapes.err" | sed -n '/^decode/,/^$/p' || { echo "bench FAILED"; fail=1; }
      DECODE_ONLY=1 DECODE_256=1 served "$preset" "$layers" "$preset $layers layers, served" ;;
    gemv)
      timeout -k 5 120 "$BIN/dsv2-gpu-check" --gemv --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-gemv.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|^device|copy d2d|^G " "$OUT_DIR/gpu-check-gemv.log" ;;
    seesaw|tma|tma-pair|roles)
      # one TMA MLA decode kernel (mla_seesaw.cu or mla_tma.cu) alone first, in its own process
      # (a kernel that traps leaves the other kernels' rows alone), then end to end with it
      timeout -k 5 200 "$BIN/dsv2-gpu-check" --mla --mla-kernels "$sec" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-$sec.log" 2>&1
      rc=$?
      grep -E "FAIL|^checks:|^device|copy d2d|cuBLAS bf16|^P1" "$OUT_DIR/gpu-check-$sec.log" | grep -v " ok "
      if [ $rc -ne 0 ] || ! grep -q "^checks: .* 0 FAIL" "$OUT_DIR/gpu-check-$sec.log"; then
        echo "$sec kernel FAILED (exit $rc)"; grep -E "rel_l2|error|Error" "$OUT_DIR/gpu-check-$sec.log" | tail -8; fail=1
      else
        DSV2_MLA_KERNEL=$sec timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-$sec.log" 2>&1 || { echo "dsv2-cuda-check ($sec) FAILED"; fail=1; }
        tail -6 "$OUT_DIR/cuda-check-$sec.log"
      fi ;;
    fp8)
      timeout -k 5 200 "$BIN/dsv2-gpu-check" --fp8 --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-fp8.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|^device|copy d2d|cuBLAS bf16|^P1-FP8|rror" "$OUT_DIR/gpu-check-fp8.log" | grep -v " ok "
      timeout -k 5 200 "$BIN/dsv2-cuda-check" --fp8 --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-fp8.log" 2>&1 || { echo "dsv2-cuda-check --fp8 FAILED"; fail=1; }
      tail -16 "$OUT_DIR/cuda-check-fp8.log" ;;
    fp8-bench)
      for dt in bf16 fp8; do
        echo "-- --kv-cache-dtype $dt"
        DSV2_KV_CACHE_DTYPE=$dt CONTEXTS=4096 BATCHES=64,256 LIMIT_S="${BENCH_LIMIT_S:-150}" OUT=/tmp/gd-bench-$dt bash scripts/gpu-bench.sh
      done ;;
    fp8-served)
      ROUTER_ARGS="--kv-cache-dtype fp8 ${ROUTER_ARGS:-}" served deepseek-v2 4 "4-layer V2, fp8 KV cache" ;;
    mla)
      timeout -k 5 200 "$BIN/dsv2-gpu-check" --mla --mla-kernels "${MLA_KERNELS:-wgmma,mma,seesaw,tma,tma-pair}" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/gpu-check-mla.log" 2>&1 || fail=1
      grep -E "FAIL|^checks:|^device|copy d2d|cuBLAS bf16|^P1|prefill" "$OUT_DIR/gpu-check-mla.log" | grep -v " ok " ;;
    fixtures)
      timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check.log" 2>&1 || { echo "dsv2-cuda-check FAILED"; fail=1; }
      tail -14 "$OUT_DIR/cuda-check.log"
      echo "-- again with DSV2_CUDA_GRAPHS=0 (every decode step eager)"
      DSV2_CUDA_GRAPHS=0 timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-eager.log" 2>&1 || { echo "dsv2-cuda-check (graphs off) FAILED"; fail=1; }
      tail -4 "$OUT_DIR/cuda-check-eager.log"
      echo "-- again with DSV2_PREFILL_KERNEL=mma (the mma.sync prefill attention kernel)"
      DSV2_PREFILL_KERNEL=mma timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-mma.log" 2>&1 || { echo "dsv2-cuda-check (mma prefill) FAILED"; fail=1; }
      tail -4 "$OUT_DIR/cuda-check-mma.log"
      echo "-- again with DSV2_SMALL_EXPERTS=0 (grouped expert kernels at every batch size)"
      DSV2_SMALL_EXPERTS=0 timeout -k 5 200 "$BIN/dsv2-cuda-check" --cache-dir /tmp/dsv2-cubin >"$OUT_DIR/cuda-check-grouped.log" 2>&1 || { echo "dsv2-cuda-check (grouped) FAILED"; fail=1; }
      tail -12 "$OUT_DIR/cuda-check-grouped.log" ;;
    served)
      served deepseek-v2 4 "4-layer V2"
      DECODE_ONLY=1 served deepseek-v2 4 "4-layer V2, per-expert cuBLAS loop (DSV2_GROUPED_EXPERTS=0)" DSV2_GROUPED_EXPERTS=0
      PREFILL_ONLY=1 served deepseek-v2 4 "4-layer V2, prefill experts on the per-expert cuBLAS loop (DSV2_GROUPED_PREFILL=0)" DSV2_GROUPED_PREFILL=0
      PREFILL_ONLY=1 served deepseek-v2 4 "4-layer V2, prefill attention on the mma.sync kernel (DSV2_PREFILL_KERNEL=mma)" DSV2_PREFILL_KERNEL=mma ;;
    lite)
      served deepseek-v2-lite 27 "V2-Lite 27-layer" ;;
    prefix)
      # issue 15's GPU row: 64 requests of one 2048-token prefix + an own 32-token question, all
      # at once, with the prefix cache and with --no-prefix-cache (bench/prefix_cache.sh)
      dir=/tmp/gd-deepseek-v2-4
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset deepseek-v2 --layers 4 --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      BIN="$BIN" MODEL_ARGS="--model-dir $dir --random-weights 1 --device cuda:0" \
        ROUTER_ARGS="--kv-cache-blocks 16384 --max-running 256 --max-queue 2048" \
        timeout -k 5 200 bash bench/prefix_cache.sh >"$OUT_DIR/prefix.log" 2>&1 || { echo "prefix cache bench FAILED"; fail=1; }
      grep -iE "===|time to first|average|tokens/s|prefix_cache|cached_blocks|engine_steps" "$OUT_DIR/prefix.log" | head -30 ;;
    host-tier)
      # issue 15's host tier: restore vs recompute for 2K and 16K prefixes (and the lengths
      # between, to see from where restoring pays), then the engine check; per-layer bytes are
      # those of the full model, so the restore time scales with layers, as the prefill does
      for m in deepseek-v2:4 deepseek-v2-lite:27; do
        preset=${m%:*} layers=${m#*:}
        dir=/tmp/gd-$preset-$layers
        mkdir -p "$dir"
        "$BIN/dsv2" init-random --preset "$preset" --layers "$layers" --config-only --out "$dir" --seed 1 >/dev/null 2>&1
        echo "-- $preset, $layers layers"
        timeout -k 5 200 "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 \
          --host-restore "${HOST_RESTORE_LENS:-256,512,1024,2048,4096,8192,16384}" --runs 3 \
          --json "$OUT_DIR/host-restore-$preset-$layers.json" 2>"$OUT_DIR/host-restore-$preset-$layers.err" \
          || { echo "host-tier bench FAILED ($preset)"; tail -5 "$OUT_DIR/host-restore-$preset-$layers.err"; fail=1; }
      done ;;
    bench)
      # in-process decode and prefill of distinct prompts against the roofline (dsv2 bench)
      LIMIT_S="${BENCH_LIMIT_S:-150}" OUT=/tmp/gd-bench bash scripts/gpu-bench.sh ;;
    bench-eager)
      echo "-- CUDA graphs off (DSV2_CUDA_GRAPHS=0)"
      DSV2_CUDA_GRAPHS=0 LIMIT_S="${BENCH_LIMIT_S:-150}" OUT=/tmp/gd-bench-eager bash scripts/gpu-bench.sh ;;
    lite-bench)
      PRESET=deepseek-v2-lite LAYERS=27 LIMIT_S="${BENCH_LIMIT_S:-150}" OUT=/tmp/gd-bench-lite bash scripts/gpu-bench.sh ;;
    lite-bench-eager)
      echo "-- CUDA graphs off (DSV2_CUDA_GRAPHS=0)"
      DSV2_CUDA_GRAPHS=0 PRESET=deepseek-v2-lite LAYERS=27 LIMIT_S="${BENCH_LIMIT_S:-150}" OUT=/tmp/gd-bench-lite-eager bash scripts/gpu-bench.sh ;;
    profile)
      # where a decode step's time goes at batch 1 (ops timed one by one, stream synchronised
      # around each: slower overall, but the split is what counts)
      dir=/tmp/gd-deepseek-v2-4
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset deepseek-v2 --layers 4 --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      DSV2_PROFILE=1 timeout -k 5 120 "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 --batch 1 \
        --new-tokens 16 --runs 1 2>&1 >/dev/null | sed -n '/DSV2_PROFILE/,$p' | head -40 ;;
    profile-lite256)
      # the same split for V2-Lite at batch 256 (ops long enough that the per-op sync matters little)
      dir=/tmp/gd-deepseek-v2-lite-27
      mkdir -p "$dir"
      "$BIN/dsv2" init-random --preset deepseek-v2-lite --layers 27 --config-only --out "$dir" --seed 1 >/dev/null 2>&1
      DSV2_PROFILE=1 timeout -k 5 150 "$BIN/dsv2" bench --device cuda:0 --model-dir "$dir" --random-weights 1 --batch 256 \
        --context 512 --new-tokens 8 --runs 1 2>&1 >/dev/null | sed -n '/DSV2_PROFILE/,$p' | head -40 ;;
    *) echo "unknown section $sec"; fail=1 ;;
  esac
done
echo "gpu-decode exit status: $fail after $(( $(date +%s) - t0 )) s"
exit $fail
