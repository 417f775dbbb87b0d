// See cpu_row_loops.h. The same source (cpu_row_loops.inc) compiled for the baseline, AVX2 and AVX-512.
#include "cpu_row_loops.h"

#include <algorithm>
#include <cmath>

#include "cpu_isa.h"

namespace sq {
namespace {

namespace portable {
#define SQ_ROW_ATTR static
#include "cpu_row_loops.inc"
#undef SQ_ROW_ATTR
}  // namespace portable

#if defined(__x86_64__) || defined(__i386__)
namespace avx2 {
#define SQ_ROW_ATTR __attribute__((target("avx2"))) static
#include "cpu_row_loops.inc"
#undef SQ_ROW_ATTR
}  // namespace avx2

namespace avx512 {
#define SQ_ROW_ATTR __attribute__((target("avx2,avx512f,avx512bw,prefer-vector-width=512"))) static
#include "cpu_row_loops.inc"
#undef SQ_ROW_ATTR
}  // namespace avx512
#endif

#define SQ_ROW_TABLE(ns) {ns::max_abs, ns::sum, ns::sum_squares, ns::quantize}
constexpr RowLoops kPortable = SQ_ROW_TABLE(portable);
#if defined(__x86_64__) || defined(__i386__)
constexpr RowLoops kAvx2 = SQ_ROW_TABLE(avx2);
constexpr RowLoops kAvx512 = SQ_ROW_TABLE(avx512);
#endif
#undef SQ_ROW_TABLE

}  // namespace

const RowLoops& row_loops() {
#if defined(__x86_64__) || defined(__i386__)
  switch (cpu_isa()) {
    case CpuIsa::kAvx512Vnni: return kAvx512;  // AVX512-VNNI CPUs have AVX-512 F and BW
    case CpuIsa::kAvxVnni:
    case CpuIsa::kAvx2: return kAvx2;
    default: return kPortable;
  }
#else
  return kPortable;
#endif
}

}  // namespace sq
