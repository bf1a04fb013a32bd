#!/usr/bin/env bash
# `dsv2 mmlu` through dsv2-router on the CPU tiny model, once with the prefix cache (the default)
# and once with --no-prefix-cache (issue 15). Every question of a subject repeats the subject's
# few-shot header, and its four candidate requests repeat the question: with the cache only the
# first request computes them. Prints each run's accuracy lines, time and cached share (stderr of
# dsv2 mmlu) and the router's prefix-cache counters.
#
#   bench/prefix_cache_mmlu.sh
#   SUBJECTS=anatomy QUESTIONS=20 bench/prefix_cache_mmlu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DATA=${DATA:-../shared/data/mmlu}
SUBJECTS=${SUBJECTS:-abstract_algebra,anatomy,high_school_geography}
QUESTIONS=${QUESTIONS:-8}
CONCURRENCY=${CONCURRENCY:-8}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${PORT:-$(free_port)}
METRICS=${METRICS:-$(free_port)}
work=$(mktemp -d)
trap 'kill "${router:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

for mode in cache no-cache; do
    flags=()
    [ "$mode" = no-cache ] && flags=(--no-prefix-cache)
    "$BIN/dsv2-router" --model-dir tiny --listen "127.0.0.1:$PORT" \
        --metrics-listen "127.0.0.1:$METRICS" "${flags[@]}" \
        --log-level warn >"$work/router-$mode.out" 2>"$work/router-$mode.err" &
    router=$!
    for _ in $(seq 600); do
        grep -qs DSV2_READY "$work/router-$mode.out" && break
        kill -0 "$router" || { cat "$work/router-$mode.err"; exit 1; }
        sleep 0.2
    done
    echo "=== $mode: dsv2 mmlu --subjects $SUBJECTS --max-questions-per-subject $QUESTIONS --concurrency $CONCURRENCY"
    "$BIN/dsv2" mmlu --endpoint "http://127.0.0.1:$PORT" --data-dir "$DATA" \
        --subjects "$SUBJECTS" --max-questions-per-subject "$QUESTIONS" \
        --concurrency "$CONCURRENCY" --report "$work/mmlu-$mode.json" 2>&1 |
        grep -v '^note: .*README.md says'
    curl -s "http://127.0.0.1:$METRICS/metrics" |
        grep -E '^dsv2_router_(prefix_cache|kv_cache_cached|kv_cache_evicted|engine_steps)' || true
    kill "$router"
    wait "$router" 2>/dev/null || true
    router=
done
python3 - "$work/mmlu-cache.json" "$work/mmlu-no-cache.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
qa, qb = a["questions"], b["questions"]
same = sum(x["prediction"] == y["prediction"] for x, y in zip(qa, qb))
diff = max(abs(u - v) for x, y in zip(qa, qb) for u, v in zip(x["logprobs"], y["logprobs"]))
print(f"=== same prediction for {same} of {len(qa)} questions; largest candidate logprob difference {diff:.2e}")
print(f"time: {a['seconds']:.1f} s with the cache (hit rate {a['prefix_cache_hit_rate']:.3f}), "
      f"{b['seconds']:.1f} s without: {b['seconds'] / a['seconds']:.2f}x")
EOF
