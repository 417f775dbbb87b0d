// Which instruction set the CPU int8 GEMM runs on: the best this CPU has, picked once at run time, or a
// lower one chosen through SQ_ONNX_CPU_ISA / sq_onnx_cpu_select_isa, so tests can hold every path to the same
// bit-exact reference and benchmarks can compare them on one machine.
#pragma once

// AVX-VNNI (VEX) intrinsics arrived in GCC 11 and clang 12; older compilers build the other paths.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define SQ_HAVE_AVXVNNI 1
#endif

namespace sq {

// Ordered: each path needs what the ones below it need (VNNI paths also use AVX2).
enum class CpuIsa : int {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // int8 widened to int16, vpmaddwd; F16C for the fp16 epilogue
  kAvxVnni = 2,     // vpdpbusd, VEX (Alder Lake and later clients, Sierra Forest, Zen 5)
  kAvx512Vnni = 3,  // vpdpbusd on 512-bit vectors (Cascade Lake and later Xeons, Zen 4 and later)
};

CpuIsa best_cpu_isa();
// The path in use: SQ_ONNX_CPU_ISA (scalar, avx2, avxvnni, avx512vnni) when set and supported, else the best.
CpuIsa cpu_isa();
// False (nothing changed) when this CPU lacks that instruction set.
bool select_cpu_isa(int isa);

}  // namespace sq
