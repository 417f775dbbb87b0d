// The Hopper (sm_90a) int8 GEMM of cuda_gemm_sm90.cu, built only when CUTLASS's headers were found
// (SQ_ONNX_WITH_SM90_GEMM). Same contract and arithmetic as cuda::int8_matmul_dequant.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

namespace sq {
namespace cuda {

// fp16 only (float32 activations are not an LLM deployment format on GPUs; they keep mma.sync). Launches on
// `stream` and returns true, or returns false having launched nothing when the problem does not suit this path
// (K % 16, N % 8, a pointer not 16-byte aligned, sizes past int); the caller then falls back.
// Only call it on a compute capability 9.0 device.
bool sm90_int8_matmul_dequant(const int8_t* xq, const __half* x_scale, const int8_t* wq, const __half* w_scale,
                              const __half* bias, int64_t m, int64_t n, int64_t k, __half* y, int sm_count,
                              void* stream);

// The launch decision without a GPU: 0 when the problem would run here, 1 when it fails our preconditions,
// 2 when CUTLASS's own host-side checks refuse it (or it would need a workspace). For tests.
int sm90_accepts(int64_t m, int64_t n, int64_t k, int sm_count);

}  // namespace cuda
}  // namespace sq
