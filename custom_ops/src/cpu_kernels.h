// CPU reference kernels of the sq_onnx ops: plain functions on raw pointers, independent of ONNX Runtime,
// so the op wrappers (ops_cpu.cc) stay thin and the arithmetic is defined in one place.
//
// Per-token quantization (shared by every op): scale = T(max(|row|max, 1e-12) / 127), computed in float
// and rounded to the activation type T; q = clamp(rint(x / float(scale)), -127, 127) in round-half-to-even,
// with the stored scale, so dequantization uses exactly the scale that quantized. A scale that rounds to
// zero (fp16 underflow) gives q = 0. Norm statistics are accumulated in double, then rounded to float.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace sq {

struct half_t {
  uint16_t bits;
};
float to_float(float v);
float to_float(half_t v);
template <typename T>
T from_float(float v);

// Runs body(i) for i in [0, total), possibly on several threads.
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& body)>;
ParallelFor serial_for();

template <typename T>
void quantize_per_token(const T* x, const T* smooth_inv, int64_t rows, int64_t k, int8_t* q, T* scale,
                        const ParallelFor& pf);

// RMSNorm (skip == nullptr) or skip + residual RMSNorm (sum_out receives x + skip [+ bias], rounded to T),
// then per-token quantization of y = x / sqrt(mean(x^2) + eps) * gamma.
template <typename T>
void rmsnorm_quant(const T* x, const T* skip, const T* bias, const T* gamma, float eps, int64_t rows,
                   int64_t k, int8_t* q, T* scale, T* sum_out, const ParallelFor& pf);

template <typename T>
void layernorm_quant(const T* x, const T* gamma, const T* beta, float eps, int64_t rows, int64_t k,
                     int8_t* q, T* scale, const ParallelFor& pf);

// Wq [N, K] rearranged once for this CPU's GEMM, for weights that stay the same across calls (an ONNX
// initializer): the VNNI paths' panels (cpu_gemm_vnni.h), which calls of 64 rows or more otherwise pack for
// themselves and calls of fewer rows do without. Used for 2-255 rows. A second copy of W (ONNX Runtime keeps the
// initializer) for about 10% of a 32-token prefill (tools/RESULTS.md): opt-in, SQ_ONNX_CPU_PREPACK=1.
struct PrepackedWeights;
// nullptr unless opted in and this CPU's GEMM has a packed form (VNNI).
std::shared_ptr<const PrepackedWeights> prepack_weights(const int8_t* wq, int64_t n, int64_t k);

// Y[m, n] = float(sum_k Xq[m, k] * Wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]); Wq is [N, K]. `packed`, when
// made from this very wq (and for the instruction set in use), replaces W's layout; the result is the same.
template <typename T>
void int8_matmul_dequant(const int8_t* xq, const T* x_scale, const int8_t* wq, const T* w_scale,
                         const T* bias, int64_t m, int64_t n, int64_t k, T* y, const ParallelFor& pf,
                         const PrepackedWeights* packed = nullptr);

// How the last int8 GEMM in this process took W (for tests): kWeightsAsGiven, kWeightsRepacked (all of it, in
// the call), kWeightsPrepacked (ahead of the call), kWeightsPackedByBlock (in the call, a block of columns at a time).
constexpr int kWeightsAsGiven = 0, kWeightsRepacked = 1, kWeightsPrepacked = 2, kWeightsPackedByBlock = 3;
int last_gemm_weights();

// The int32 accumulators alone (for tests and the benchmark): acc[m, n] = sum_k Xq[m, k] * Wq[n, k].
void int8_gemm_s32(const int8_t* xq, const int8_t* wq, int64_t m, int64_t n, int64_t k, int32_t* acc,
                   const ParallelFor& pf);

}  // namespace sq
