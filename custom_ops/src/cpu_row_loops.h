// The inner loops of the per-token quantization and the norms (cpu_kernels.cc), built once per vector width
// and taken for the instruction set the CPU GEMM uses (cpu_isa(): the best this CPU has, or the one chosen
// through SQ_ONNX_CPU_ISA), so tests hold each build to the reference. IEEE division, max and sums in a
// fixed order of eight lanes give the same bits at every width.
#pragma once
#include <cstdint>

namespace sq {

struct RowLoops {
  float (*max_abs)(const float* v, int64_t k);
  double (*sum)(const float* v, int64_t k);                        // in double, eight interleaved lanes
  double (*sum_squares)(const float* v, int64_t k, float shift);   // of the float differences v - shift
  void (*quantize)(const float* v, int64_t k, float scale, int8_t* q);  // clamp(rint(v / scale), +-127)
};

const RowLoops& row_loops();

}  // namespace sq
