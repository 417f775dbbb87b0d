// CUDA backend of the sq_onnx ops: the kernels of cuda_kernels.cu, launched on ORT's compute stream
// (KernelContext_GetGPUComputeStream), never the default stream. Registered for the CUDA provider.
#include "cuda_kernels.h"
#include "ops_common.h"
#include "ops_cpu.h"

namespace sq {
namespace {

void* compute_stream(const Call& c) {
  void* stream = c.ctx.GetGPUComputeStream();
  require(stream != nullptr, "sq_onnx CUDA op: ONNX Runtime gave no GPU compute stream");
  return stream;
}

struct CudaBackend {
  template <typename T>
  static void quantize_per_token(Call& c, const T* x, const T* si, int64_t rows, int64_t k, int8_t* q, T* s) {
    cuda::quantize_per_token(x, si, rows, k, q, s, compute_stream(c));
  }
  template <typename T>
  static void rmsnorm_quant(Call& c, const T* x, const T* skip, const T* bias, const T* g, float eps, int64_t rows,
                            int64_t k, int8_t* q, T* s, T* sum) {
    cuda::rmsnorm_quant(x, skip, bias, g, eps, rows, k, q, s, sum, compute_stream(c));
  }
  template <typename T>
  static void layernorm_quant(Call& c, const T* x, const T* g, const T* b, float eps, int64_t rows, int64_t k,
                              int8_t* q, T* s) {
    cuda::layernorm_quant(x, g, b, eps, rows, k, q, s, compute_stream(c));
  }
  struct GemmWeights {};  // W is read as it is
  static GemmWeights gemm_weights(const OrtKernelInfo*) { return {}; }
  template <typename T>
  static void int8_matmul_dequant(Call& c, const GemmWeights&, const int8_t* xq, const T* xs, const int8_t* wq,
                                  const T* ws, const T* bias, int64_t m, int64_t n, int64_t k, T* y) {
    cuda::int8_matmul_dequant(xq, xs, wq, ws, bias, m, n, k, y, compute_stream(c));
  }
};

constexpr const char* kCudaEp = "CUDAExecutionProvider";

}  // namespace

std::vector<const OrtCustomOp*> cuda_ops() { return all_ops<CudaBackend>(kCudaEp); }

}  // namespace sq
