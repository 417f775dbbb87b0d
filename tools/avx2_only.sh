#!/usr/bin/env bash
# Run a command as if this x86-64 CPU had AVX2 but no AVX-512, VNNI or AMX: every library in it (ONNX Runtime's
# MLAS, numpy, torch, sq-onnx's kernels) takes the code path it takes on an AVX2-only CPU, on this machine's
# cores. Needs Linux's CPUID faulting ("cpuid_fault" in /proc/cpuinfo) and a C compiler; see
# tools/avx2_only/avx2_only.c for how. Issue 28's AVX2 reading:
#   tools/avx2_only.sh sq-onnx bench demo_out/w4/model.onnx --threads 2 --decode-tokens 64 --repeats 3
# Prints, first, what the libraries see; SQ_AVX2_ONLY_QUIET=1 leaves that out.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { echo "usage: tools/avx2_only.sh COMMAND [ARGS...]" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || { echo "avx2_only: x86-64 only (this is $(uname -m))" >&2; exit 2; }
grep -qw cpuid_fault /proc/cpuinfo || { echo "avx2_only: this CPU or VM cannot make CPUID fault (no cpuid_fault in /proc/cpuinfo)" >&2; exit 2; }
grep -qw avx2 /proc/cpuinfo || { echo "avx2_only: this CPU has no AVX2 to keep" >&2; exit 2; }
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sq-onnx
lib=$cache/avx2_only.so
src=$here/avx2_only/avx2_only.c
if [ ! -f "$lib" ] || [ "$src" -nt "$lib" ]; then
  mkdir -p "$cache"
  "${CC:-cc}" -O2 -Wall -shared -fPIC -o "$lib.$$.tmp" "$src" -ldl  # per process: parallel first runs
  mv "$lib.$$.tmp" "$lib"
fi
if [ "${SQ_AVX2_ONLY_QUIET:-0}" != 1 ]; then
  LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD} "${PYTHON:-python3}" - <<'PY' >&2 || true
import importlib.util as u
seen = []
if u.find_spec("sq_onnx"):
    from sq_onnx.runtime.cpu_info import cpu_description
    seen.append("numpy (sq_onnx's cpu_info) " + cpu_description().rsplit(", ", 1)[1])
if u.find_spec("torch"):
    import torch
    seen.append("torch " + torch.backends.cpu.get_cpu_capability())
print("avx2_only: CPUID now reports no AVX-512 / VNNI / AMX; " + ", ".join(seen))
PY
fi
LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD} exec "$@"
