#!/usr/bin/env bash
# Benchmark of `dsv2 convert` (issue 6): generate a multi-GB random checkpoint with real
# DeepSeek-V2-Lite dims (init-random), evict it from the page cache, measure the disk's read
# bandwidth with O_DIRECT reads in the same run, then convert under /usr/bin/time -v and report
# throughput ÷ read bandwidth and peak RSS. Generated files live under $WORK (default /tmp) and
# are deleted at the end.
#
# Page cache: dropping all caches needs root's /proc/sys/vm/drop_caches, which this container
# refuses; instead each source file is evicted with `dd iflag=nocache count=0`
# (posix_fadvise DONTNEED on a synced file) and `fincore` shows what stayed resident.
set -euo pipefail
LAYERS=${LAYERS:-4}
SHARDS=${SHARDS:-2}
THREADS=${THREADS:-2}
WORK=${WORK:-/tmp}/dsv2-convert-bench.$$
BIN=${BIN:-target/release/dsv2}
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"

evict() { sync; for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done; }

echo "## init-random: deepseek-v2-lite, $LAYERS layers"
/usr/bin/time -f "init-random: %e s wall, max RSS %M KiB" \
  "$BIN" init-random --preset deepseek-v2-lite --layers "$LAYERS" --out "$WORK/hf" --threads "$THREADS"
SRC_BYTES=$(cat "$WORK"/hf/*.safetensors | wc -c)
echo "source: $(ls "$WORK"/hf/*.safetensors | wc -l) files, $SRC_BYTES bytes"

evict "$WORK"/hf/*.safetensors
echo "resident after eviction:"; fincore "$WORK"/hf/*.safetensors

# Disk read bandwidth: O_DIRECT (bypasses the page cache) over every source file, sequentially.
T0=$(date +%s.%N)
for f in "$WORK"/hf/*.safetensors; do dd if="$f" of=/dev/null bs=16M iflag=direct status=none; done
T1=$(date +%s.%N)
READ_BW=$(python3 -c "print($SRC_BYTES / ($T1 - $T0) / 1e6)")
echo "disk read (dd iflag=direct, bs=16M): $SRC_BYTES bytes in $(python3 -c "print(round($T1-$T0,2))") s = $READ_BW MB/s"

evict "$WORK"/hf/*.safetensors
T0=$(date +%s.%N)
/usr/bin/time -v "$BIN" convert --model-dir "$WORK/hf" --output-dir "$WORK/conv" \
  --expert-shards "$SHARDS" --threads "$THREADS" --max-file-gb "${MAX_FILE_GB:-4}" 2> "$WORK/time.txt"
T1=$(date +%s.%N)
grep -E "converted|Maximum resident|Elapsed|File system" "$WORK/time.txt" || true
CONV_BW=$(python3 -c "print($SRC_BYTES / ($T1 - $T0) / 1e6)")
RSS=$(grep "Maximum resident" "$WORK/time.txt" | awk '{print $NF}')
echo "convert: $SRC_BYTES source bytes in $(python3 -c "print(round($T1-$T0,2))") s = $CONV_BW MB/s"
echo "throughput / disk read bandwidth = $(python3 -c "print(round($CONV_BW / $READ_BW, 3))")"
echo "peak RSS = $RSS KiB ($(python3 -c "print(round($RSS/1048576, 3))") GiB)"
du -sh "$WORK/conv"

# Converted files must serve: one forward pass over 3 tokens from the converted dir.
evict "$WORK"/conv/*/*.safetensors
/usr/bin/time -f "logits from converted dir: %e s, max RSS %M KiB" \
  "$BIN" logits --model-dir "$WORK/conv" --token-ids 100000,17464,3 --out "$WORK/l.safetensors" >/dev/null
