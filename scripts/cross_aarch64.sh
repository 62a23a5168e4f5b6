#!/usr/bin/env bash
# Builds the C kernel library for aarch64 (Jetson) with a cross compiler, runs every entry point
# under qemu-user through scripts/native_selftest.c, and compares the numbers with the same
# driver built for this machine with the portable kernel set (the only set compiled on aarch64).
#
#   scripts/cross_aarch64.sh [WORK]      (default /tmp/pddnet-aarch64)
#
# Needs (Debian): apt-get install gcc-aarch64-linux-gnu qemu-user.  The flags are setup.py's
# COMMON flags (plus -static, so qemu needs no aarch64 root file system).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/pddnet-aarch64}"
N=src/pddnet/backends/native
FLAGS=(-O3 -ffp-contract=off -fno-math-errno -fno-trapping-math -pthread -I "$N")
PORTABLE=("$N/pdd_head.c" "$N/pdd_refine.c" "$N/pdd_sample.c" "$N/pdd_conv.c" "$N/pdd_k_portable.c")
mkdir -p "$WORK"
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install gcc-aarch64-linux-gnu qemu-user" >&2; exit 2; }
done

# this machine: the x86 sets are compiled too (pdd_head.c picks among them); run the portable one
HOST=("${PORTABLE[@]}")
if [[ "$(uname -m)" == x86_64 ]]; then
  gcc "${FLAGS[@]}" -msse2 -c "$N/pdd_k_sse2.c" -o "$WORK/k_sse2.o"
  gcc "${FLAGS[@]}" -mavx2 -mfma -ffp-contract=fast -c "$N/pdd_k_avx2.c" -o "$WORK/k_avx2.o"
  gcc "${FLAGS[@]}" -mavx512f -mavx512vl -mavx512dq -mavx2 -mfma -mprefer-vector-width=512 \
      -ffp-contract=fast -c "$N/pdd_k_avx512.c" -o "$WORK/k_avx512.o"
  HOST+=("$WORK/k_sse2.o" "$WORK/k_avx2.o" "$WORK/k_avx512.o")
fi
gcc "${FLAGS[@]}" scripts/native_selftest.c "${HOST[@]}" -lm -o "$WORK/selftest_host"
aarch64-linux-gnu-gcc "${FLAGS[@]}" -Wall -Wextra -static scripts/native_selftest.c "${PORTABLE[@]}" \
    -lm -o "$WORK/selftest_aarch64"
file "$WORK/selftest_aarch64" | sed 's/, BuildID.*//'

"$WORK/selftest_host" 0 > "$WORK/host.txt"
qemu-aarch64 "$WORK/selftest_aarch64" -1 > "$WORK/aarch64.txt"
python3 - "$WORK/host.txt" "$WORK/aarch64.txt" <<'PY'
import sys
def read(p):
    out = {}
    for line in open(p):
        name, i, v = line.split()
        out.setdefault(name, []).append(float(v))
    return out
a, b = read(sys.argv[1]), read(sys.argv[2])
worst = 0.0
for name in a:
    d = max(abs(x - y) for x, y in zip(a[name], b[name]))
    same = sum(x == y for x, y in zip(a[name], b[name]))
    print(f"{name:14s} {len(a[name]):6d} values, {same:6d} bit-identical, max |difference| {d:.3g}")
    worst = max(worst, d)
assert a.keys() == b.keys() and all(len(a[k]) == len(b[k]) for k in a), "outputs differ in shape"
print("aarch64 portable vs host portable: max |difference|", worst)
PY
