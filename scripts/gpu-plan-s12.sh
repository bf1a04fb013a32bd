#!/usr/bin/env bash
# Session 12's device plan (one call, short: little device time was left): the roles MLA decode
# kernel's checks and P1 rows, then the grouped expert kernels' quick checks and P2g rows with the
# dynamic tile schedule (Ws128Dyn) beside Ws128 and the pair. Usage on the device:
#   OUT=$OUT bash scripts/gpu-plan-s12.sh   (binaries in .gpubin/bins.tar.xz, scripts/build-gpubin.sh)
set -u
cd "$(dirname "$0")/.."
(cd .gpubin && xz -dc bins.tar.xz | tar xf -)
B=.gpubin; C=/tmp/dsv2-cubin
echo "== $(date -u +%FT%TZ) $(nvidia-smi -L | head -1)"
echo "== roles: checks + P1"
timeout -k 5 ${ROLES_S:-70} $B/dsv2-gpu-check --mla --mla-kernels roles --cache-dir $C > $OUT/roles.log 2>&1; echo "rc=$?"
grep -E "FAIL|^checks:|^P1 |rror|trap|copy d2d|cuBLAS" $OUT/roles.log | cut -c1-230
echo "== grouped: quick checks, P2g"
timeout -k 5 ${GROUPED_S:-110} $B/dsv2-gpu-check --grouped --quick --cache-dir $C > $OUT/grouped.log 2>&1; echo "rc=$?"
grep -E "FAIL|^checks:|copy d2d|cuBLAS bf16|^P2|^D[0-9]|rror|trap" $OUT/grouped.log | cut -c1-230
[ "${MORE:-0}" = 1 ] || exit 0
echo "== P1 rows, other kernels"
timeout -k 5 110 $B/dsv2-gpu-check --mla --no-check --mla-kernels wgmma,seesaw,tma,tma-pair --cache-dir $C > $OUT/p1.log 2>&1; echo "rc=$?"
grep -E "^P1 |copy d2d|cuBLAS|rror" $OUT/p1.log | cut -c1-230
