set -u
cd .gpubin && xz -dc bins.tar.xz | tar xf - && cd ..
B=.gpubin; C=/tmp/dsv2-cubin
echo "== $(date -u +%FT%TZ) $(nvidia-smi -L | head -1)"
echo "== roles: checks + P1"
timeout -k 5 80 $B/dsv2-gpu-check --mla --mla-kernels roles --cache-dir $C > $OUT/roles.log 2>&1; echo "rc=$?"
grep -E "FAIL|^checks:|^P1 |rror|trap|copy d2d|cuBLAS" $OUT/roles.log | cut -c1-230
if grep -q "^checks: .* 0 FAIL" $OUT/roles.log; then
  echo "== roles end to end (dsv2-cuda-check)"
  DSV2_MLA_KERNEL=roles timeout -k 5 40 $B/dsv2-cuda-check --cache-dir $C > $OUT/cuda-check-roles.log 2>&1; echo "rc=$?"; tail -4 $OUT/cuda-check-roles.log | cut -c1-200
fi
echo "== P1 rows, other kernels"
timeout -k 5 110 $B/dsv2-gpu-check --mla --no-check --mla-kernels wgmma,seesaw,tma,tma-pair --cache-dir $C > $OUT/p1.log 2>&1; echo "rc=$?"
grep -E "^P1 |^PF|copy d2d|cuBLAS|rror" $OUT/p1.log | cut -c1-230
[ "${PROBES:-0}" = 1 ] || exit 0
echo "== probes: tensor-core rates and the tile stream with 1-3 buffers"
timeout -k 5 120 $B/dsv2-gpu-check --probe --cache-dir $C > $OUT/probe.log 2>&1; echo "rc=$?"
grep -E "^PROBE|copy d2d|cuBLAS|rror" $OUT/probe.log | cut -c1-230
