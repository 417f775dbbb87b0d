// CPU feature detection for the int8 GEMM; see cpu_isa.h.
#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sq {
namespace {

bool supported(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case CpuIsa::kAvxVnni: return supported(CpuIsa::kAvx2) && __builtin_cpu_supports("avxvnni");
    case CpuIsa::kAvx512Vnni:
      return supported(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == CpuIsa::kScalar;
#endif
}

CpuIsa from_env(CpuIsa best) {
  const char* env = std::getenv("SQ_ONNX_CPU_ISA");
  if (env == nullptr) return best;
  static const char* const names[] = {"scalar", "avx2", "avxvnni", "avx512vnni"};
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(env, names[i]) == 0 && supported(static_cast<CpuIsa>(i))) return static_cast<CpuIsa>(i);
  return best;  // unknown or unsupported: the best this CPU has
}

std::atomic<int> g_isa{-1};

}  // namespace

CpuIsa best_cpu_isa() {
  static const CpuIsa best = [] {
    for (int i = 3; i > 0; --i)
      if (supported(static_cast<CpuIsa>(i))) return static_cast<CpuIsa>(i);
    return CpuIsa::kScalar;
  }();
  return best;
}

CpuIsa cpu_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(from_env(best_cpu_isa()));
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(v);
}

bool select_cpu_isa(int isa) {
  if (isa < 0 || isa > 3 || !supported(static_cast<CpuIsa>(isa))) return false;
  g_isa.store(isa, std::memory_order_relaxed);
  return true;
}

}  // namespace sq

// For tests and tools/bench_cpu_kernels.py: 0 when taken, 1 when this CPU lacks it.
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_select_isa(int isa) {
  return sq::select_cpu_isa(isa) ? 0 : 1;
}
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_isa() { return static_cast<int>(sq::cpu_isa()); }
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_best_isa() {
  return static_cast<int>(sq::best_cpu_isa());
}
