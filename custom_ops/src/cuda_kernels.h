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
// Wq is [N, K]. Tensor cores (mma.sync s8) when K % 16 == 0 and the int8 pointers are 16-byte aligned.
template <typename T>
void int8_matmul_dequant(const int8_t* xq, const T* x_scale, const int8_t* wq, const T* w_scale, const T* bias,
                         int64_t m, int64_t n, int64_t k, T* y, void* stream);

}  // namespace cuda
}  // namespace sq
