// CPU feature detection for the int8 GEMM; see cpu_isa.h.
#include "cpu_isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace sq {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// From CPUID and XGETBV directly: __builtin_cpu_supports does not know "f16c" or "avxvnni" in every compiler
// we build with (clang 14 refuses both). A feature counts only when the OS also saves the vector registers.
struct Features {
  bool avx2 = false, avxvnni = false, avx512vnni = false;
};

Features read_features() {
  Features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  uint64_t xcr0 = 0;
  if (osxsave) {
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  }
  const bool ymm_saved = (xcr0 & 0x6) == 0x6, zmm_saved = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = avx && f16c && ymm_saved && (b & (1u << 5));
  const bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30), vnni512 = c & (1u << 11);
  f.avx512vnni = f.avx2 && zmm_saved && avx512f && avx512bw && vnni512;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avxvnni = f.avx2 && (a & (1u << 4));
  return f;
}

bool supported(CpuIsa isa) {
  static const Features f = read_features();
  switch (isa) {
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2: return f.avx2;
#ifdef SQ_HAVE_AVXVNNI
    case CpuIsa::kAvxVnni: return f.avxvnni;
#else
    case CpuIsa::kAvxVnni: return false;
#endif
    case CpuIsa::kAvx512Vnni: return f.avx512vnni;
  }
  return false;
}
#else
bool supported(CpuIsa isa) { return isa == CpuIsa::kScalar; }
#endif

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

// The instruction set the int8 GEMM runs with (sq-onnx bench reports it).
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_isa() { return static_cast<int>(sq::cpu_isa()); }

#ifdef SQ_ONNX_TEST_HOOKS
// For tests and tools/bench_cpu_kernels.py: 0 when taken, 1 when this CPU lacks it.
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_select_isa(int isa) {
  return sq::select_cpu_isa(isa) ? 0 : 1;
}
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_best_isa() {
  return static_cast<int>(sq::best_cpu_isa());
}
#endif
