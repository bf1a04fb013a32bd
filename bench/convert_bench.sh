#!/usr/bin/env bash
# Benchmark of `dsv2 convert` (issue 6): generate a multi-GB random checkpoint with real
# DeepSeek-V2-Lite dims (init-random), evict it from the page cache, measure the disk's read
# bandwidth with O_DIRECT reads in the same run, and a read+write ceiling (an O_DIRECT read of
# the source concurrently with an O_DIRECT write of as many bytes, since the conversion reads and
# writes every byte on the same disk), then convert under /usr/bin/time -v and report throughput
# ÷ read bandwidth (the issue's metric), throughput ÷ the read+write ceiling, and peak RSS.
# The reads, and the ceiling, are measured with 1 stream (the issue's metric) and with STREAMS
# (default 4) concurrent streams.
# RUNS lists conversions as THREADS:MAX_FILE_GB pairs (default "$THREADS:$MAX_FILE_GB"), each
# from an evicted source into a fresh output dir. Generated files live under $WORK (default /tmp)
# and are deleted at the end, also on Ctrl-C.
#
# Page cache: dropping all caches needs root's /proc/sys/vm/drop_caches, which this container
# refuses; instead each source file is evicted with `dd iflag=nocache count=0`
# (posix_fadvise DONTNEED on a synced file) and `fincore` shows what stayed resident.
set -euo pipefail
LAYERS=${LAYERS:-4}
SHARDS=${SHARDS:-2}
THREADS=${THREADS:-2}
MAX_FILE_GB=${MAX_FILE_GB:-4}
RUNS=${RUNS:-$THREADS:$MAX_FILE_GB}
WORK=${WORK:-/tmp}/dsv2-convert-bench.$$
BIN=${BIN:-target/release/dsv2}
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$WORK"

evict() { sync; for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done; }

echo "## init-random: deepseek-v2-lite, $LAYERS layers"
/usr/bin/time -f "init-random: %e s wall, max RSS %M KiB" \
  "$BIN" init-random --preset deepseek-v2-lite --layers "$LAYERS" --out "$WORK/hf" --threads "$THREADS"
SRC_BYTES=$(cat "$WORK"/hf/*.safetensors | wc -c)
echo "source: $(ls "$WORK"/hf/*.safetensors | wc -l) files, $SRC_BYTES bytes"

evict "$WORK"/hf/*.safetensors
echo "resident after eviction:"; fincore "$WORK"/hf/*.safetensors

py() { python3 -c "print($1)"; }
# O_DIRECT (bypasses the page cache) reads of every source file in 16 MiB blocks, the blocks of
# each file split into $1 ranges read concurrently.
read_src() {
  local p=$1 f nb i pids=()
  for f in "$WORK"/hf/*.safetensors; do
    nb=$(( ($(stat -c %s "$f") + 16777215) / 16777216 ))
    for ((i = 0; i < p; i++)); do
      dd if="$f" of=/dev/null bs=16M iflag=direct status=none \
        skip=$((i * nb / p)) count=$(((i + 1) * nb / p - i * nb / p)) & pids+=($!)
    done
    wait "${pids[@]}"; pids=()
  done
}
# O_DIRECT writes of zeros, as many 16 MiB blocks as the source has (rounded up), in $1 files
# written concurrently.
COUNT=$(( (SRC_BYTES + 16777215) / 16777216 ))
write_scratch() {
  local p=$1 i pids=()
  for ((i = 0; i < p; i++)); do
    dd if=/dev/zero of="$WORK/scratch.$i" bs=16M count=$(((i + 1) * COUNT / p - i * COUNT / p)) \
      oflag=direct status=none & pids+=($!)
  done
  wait "${pids[@]}"
}

# Disk read bandwidth (the issue's metric: one stream), and with $STREAMS streams, since the
# converter runs several files at once and this disk serves concurrent requests faster.
# Read+write ceiling: the source read while as many bytes are written to the same disk (the
# conversion reads and writes every byte there); the time until both are done.
STREAMS=${STREAMS:-4}
declare -A READ_BW CEIL_BW
for p in 1 "$STREAMS"; do
  evict "$WORK"/hf/*.safetensors
  T0=$(date +%s.%N); read_src "$p"; T1=$(date +%s.%N)
  READ_BW[$p]=$(py "$SRC_BYTES / ($T1 - $T0) / 1e6")
  echo "disk read, $p stream(s) (dd iflag=direct bs=16M): $SRC_BYTES bytes in $(py "round($T1-$T0,2)") s = ${READ_BW[$p]} MB/s"

  evict "$WORK"/hf/*.safetensors
  T0=$(date +%s.%N)
  ( read_src "$p"; date +%s.%N > "$WORK/ceil-read.t" ) & RPID=$!
  write_scratch "$p"; TW=$(date +%s.%N)
  wait "$RPID"; T1=$(date +%s.%N)
  rm -f "$WORK"/scratch.*
  CEIL_BW[$p]=$(py "$SRC_BYTES / ($T1 - $T0) / 1e6")
  echo "read+write ceiling, $p+$p stream(s) (dd direct read ‖ dd direct write of $((COUNT * 16)) MiB zeros):" \
    "both done in $(py "round($T1-$T0,2)") s (read $(py "round($(cat "$WORK/ceil-read.t")-$T0,2)") s," \
    "write $(py "round($TW-$T0,2)") s) = ${CEIL_BW[$p]} MB/s of source"
done

for run in $RUNS; do
  T=${run%%:*}; GB=${run##*:}
  rm -rf "$WORK/conv"
  evict "$WORK"/hf/*.safetensors
  echo "## convert --threads $T --max-file-gb $GB"
  T0=$(date +%s.%N)
  /usr/bin/time -v "$BIN" convert --model-dir "$WORK/hf" --output-dir "$WORK/conv" \
    --expert-shards "$SHARDS" --threads "$T" --max-file-gb "$GB" 2> "$WORK/time.txt"
  T1=$(date +%s.%N)
  grep -E "converted|Maximum resident|Elapsed|File system|Percent of CPU" "$WORK/time.txt" || true
  CONV_BW=$(py "$SRC_BYTES / ($T1 - $T0) / 1e6")
  RSS=$(grep "Maximum resident" "$WORK/time.txt" | awk '{print $NF}')
  echo "convert: $SRC_BYTES source bytes in $(py "round($T1-$T0,2)") s = $CONV_BW MB/s ($(ls "$WORK"/conv/*/*.safetensors | wc -l) files)"
  for p in 1 "$STREAMS"; do
    echo "throughput / disk read bandwidth ($p stream(s)) = $(py "round($CONV_BW / ${READ_BW[$p]}, 3)")"
    echo "throughput / read+write ceiling ($p+$p stream(s)) = $(py "round($CONV_BW / ${CEIL_BW[$p]}, 3)")"
  done
  echo "peak RSS = $RSS KiB ($(py "round($RSS/1048576, 3)") GiB)"
  du -sh "$WORK/conv"
done

# Converted files must serve: one forward pass over 3 tokens from the converted dir.
evict "$WORK"/conv/*/*.safetensors
/usr/bin/time -f "logits from converted dir: %e s, max RSS %M KiB" \
  "$BIN" logits --model-dir "$WORK/conv" --token-ids 100000,17464,3 --out "$WORK/l.safetensors" >/dev/null
