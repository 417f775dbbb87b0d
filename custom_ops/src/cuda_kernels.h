// CUDA kernels of the sq_onnx ops (cuda_kernels.cu), with the arithmetic of cpu_kernels.h: the same
// operation order, no fused multiply-adds, so float32 results equal the CPU's bit for bit (norm
// statistics aside, which are summed in double in a different order). Every launch goes on the given
// stream (ORT's compute stream); a launch error is thrown as std::runtime_error.
#pragma once
#include <cstdint>

namespace sq {
namespace cuda {

template <typename T>
void quantize_per_token(const T* x, const T* smooth_inv, int64_t rows, int64_t k, int8_t* q, T* scale,
                        void* stream);
template <typename T>
void rmsnorm_quant(const T* x, const T* skip, const T* bias, const T* gamma, float eps, int64_t rows, int64_t k,
                   int8_t* q, T* scale, T* sum_out, void* stream);
template <typename T>
void layernorm_quant(const T* x, const T* gamma, const T* beta, float eps, int64_t rows, int64_t k, int8_t* q,
                     T* scale, void* stream);
// Wq is [N, K]. Tensor cores (mma.sync s8) when K % 16 == 0 and the int8 pointers are 16-byte aligned;
// fp16 from 5 rows on an sm_90 device with the Hopper path selected: CUTLASS wgmma (cuda_gemm_sm90.h).
template <typename T>
void int8_matmul_dequant(const int8_t* xq, const T* x_scale, const int8_t* wq, const T* w_scale, const T* bias,
                         int64_t m, int64_t n, int64_t k, T* y, void* stream);


// GEMM paths for more than 4 rows (also SQ_ONNX_CUDA_GEMM=mma|sm90, read at the first GEMM).
constexpr int kGemmMma = 1, kGemmSm90 = 2;
// Whether the Hopper path is built in and the current device is compute capability 9.0.
bool sm90_gemm_available();
// Process-wide; false (nothing changed) for an unknown path or an unavailable Hopper path.
bool select_gemm(int path);
// GEMM paths for 5-16 rows (also SQ_ONNX_CUDA_FEW_ROWS=dp4a|mma, read at the first GEMM); process-wide.
constexpr int kFewRowsDp4a = 1, kFewRowsMma = 2;
bool select_few_rows(int path);
// The kernel that served the last int8 GEMM in this process (0 before any).
constexpr int kServedGeneric = 1, kServedSkinny = 2, kServedMma = 3, kServedSm90 = 4, kServedFewRowsMma = 5;
int last_gemm_kernel();

}  // namespace cuda
}  // namespace sq
