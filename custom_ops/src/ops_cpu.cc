// CPU backend of the sq_onnx ops: the reference kernels of cpu_kernels.cc, run on ORT's intra-op threads.
#include "ops_cpu.h"

#include <memory>

#include "ops_common.h"

namespace sq {
namespace {

// ORT's thread pool through the kernel context (KernelContext_ParallelFor), one batch per task.
ParallelFor ort_parallel_for(const Call& c) {
  const Ort::KernelContext* ctx = &c.ctx;
  return [ctx](size_t total, const std::function<void(size_t)>& body) {
    if (total == 0) return;
    if (total == 1) return body(0);
    auto fn = [](void* user, size_t i) { (*static_cast<const std::function<void(size_t)>*>(user))(i); };
    ctx->ParallelFor(fn, total, total, const_cast<std::function<void(size_t)>*>(&body));
  };
}

struct CpuBackend {
  template <typename T>
  static void quantize_per_token(Call& c, const T* x, const T* si, int64_t rows, int64_t k, int8_t* q, T* s) {
    sq::quantize_per_token(x, si, rows, k, q, s, ort_parallel_for(c));
  }
  template <typename T>
  static void rmsnorm_quant(Call& c, const T* x, const T* skip, const T* bias, const T* g, float eps, int64_t rows,
                            int64_t k, int8_t* q, T* s, T* sum) {
    sq::rmsnorm_quant(x, skip, bias, g, eps, rows, k, q, s, sum, ort_parallel_for(c));
  }
  template <typename T>
  static void layernorm_quant(Call& c, const T* x, const T* g, const T* b, float eps, int64_t rows, int64_t k,
                              int8_t* q, T* s) {
    sq::layernorm_quant(x, g, b, eps, rows, k, q, s, ort_parallel_for(c));
  }
  // A constant Wq (an initializer) is packed once for this CPU's GEMM; nullptr otherwise (see prepack_weights).
  using GemmWeights = std::shared_ptr<const PrepackedWeights>;
  static GemmWeights gemm_weights(const OrtKernelInfo* info) {
    try {
      int is_constant = 0;
      Ort::ConstValue w = Ort::ConstKernelInfo(info).GetTensorConstantInput(2, &is_constant);
      if (!is_constant || !w) return nullptr;
      auto type = w.GetTensorTypeAndShapeInfo();
      auto shape = type.GetShape();
      if (type.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 || shape.size() != 2) return nullptr;
      return prepack_weights(w.GetTensorData<int8_t>(), shape[0], shape[1]);
    } catch (const std::exception&) {
      return nullptr;  // an optimisation only: the call then takes W as it comes
    }
  }
  template <typename T>
  static void int8_matmul_dequant(Call& c, const GemmWeights& packed, const int8_t* xq, const T* xs,
                                  const int8_t* wq, const T* ws, const T* bias, int64_t m, int64_t n, int64_t k, T* y) {
    sq::int8_matmul_dequant(xq, xs, wq, ws, bias, m, n, k, y, ort_parallel_for(c), packed.get());
  }
};

}  // namespace

std::vector<const OrtCustomOp*> cpu_ops() { return all_ops<CpuBackend>(nullptr); }

}  // namespace sq
