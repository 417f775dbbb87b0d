// The five sq_onnx ops as ONNX Runtime custom ops, written once over a Backend (CPU or CUDA): each
// kernel reads and checks its inputs, allocates outputs and calls Backend's kernel of the same name.
// Errors become ORT statuses (CustomOpBase<..., WithStatus=true>), never exceptions across the C ABI.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "onnxruntime_cxx_api.h"

namespace sq {

constexpr const char* kDomain = "sq_onnx";

template <typename T>
constexpr ONNXTensorElementDataType onnx_type() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void require(bool ok, const std::string& what) {
  if (!ok) throw BadInput(what);
}

// Common view of one kernel call: typed inputs, shape helpers and output allocation.
struct Call {
  Ort::KernelContext ctx;
  explicit Call(OrtKernelContext* c) : ctx(c) {}
  bool has(size_t i) const { return i < ctx.GetInputCount() && static_cast<bool>(ctx.GetInput(i)); }
  std::vector<int64_t> shape(size_t i) const { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); }
  template <typename R>
  const R* in(size_t i) const {
    return has(i) ? reinterpret_cast<const R*>(ctx.GetInput(i).GetTensorRawData()) : nullptr;
  }
  template <typename R>
  R* out(size_t i, const std::vector<int64_t>& dims) {
    return reinterpret_cast<R*>(ctx.GetOutput(i, dims).GetTensorMutableRawData());
  }
  // Rows and the last dimension of an input of rank >= 1.
  std::pair<int64_t, int64_t> rows_k(size_t i, const char* op) const {
    auto s = shape(i);
    require(!s.empty(), std::string(op) + ": input 0 must have rank >= 1");
    int64_t rows = 1;
    for (size_t d = 0; d + 1 < s.size(); ++d) rows *= s[d];
    return {rows, s.back()};
  }
  void expect_vector(size_t i, int64_t k, const char* op, const char* name) const {
    if (!has(i)) return;
    auto s = shape(i);
    require(s.size() == 1 && s[0] == k,
            std::string(op) + ": " + name + " must be a vector of the last dimension of X (" + std::to_string(k) + ")");
  }
};

inline std::vector<int64_t> with_last(std::vector<int64_t> s, int64_t last) {
  s.back() = last;
  return s;
}

inline float float_attr(const OrtKernelInfo* info, const char* name, float fallback) {
  float v = fallback;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return fallback;
  }
  return v;
}

template <typename T, typename B>
struct QuantizePerTokenKernel {
  static constexpr const char* kName = "QuantizePerToken";
  static constexpr const char* kInputs = "TT";
  static constexpr size_t kRequired = 1;
  static constexpr const char* kOutputs = "qT";
  QuantizePerTokenKernel(const OrtKernelInfo*) {}
  void Compute(Call& c) {
    auto [rows, k] = c.rows_k(0, kName);
    c.expect_vector(1, k, kName, "smooth_inv");
    auto s = c.shape(0);
    auto* q = c.out<int8_t>(0, s);
    auto* sc = c.out<T>(1, with_last(s, 1));
    B::quantize_per_token(c, c.in<T>(0), c.in<T>(1), rows, k, q, sc);
  }
};

template <typename T, typename B>
struct RMSNormQuantKernel {
  static constexpr const char* kName = "RMSNormQuant";
  static constexpr const char* kInputs = "TT";
  static constexpr size_t kRequired = 2;
  static constexpr const char* kOutputs = "qT";
  float eps;
  explicit RMSNormQuantKernel(const OrtKernelInfo* info) : eps(float_attr(info, "epsilon", 1e-6f)) {}
  void Compute(Call& c) {
    auto [rows, k] = c.rows_k(0, kName);
    require(c.has(1), "RMSNormQuant: gamma is required");
    c.expect_vector(1, k, kName, "gamma");
    auto s = c.shape(0);
    auto* q = c.out<int8_t>(0, s);
    auto* sc = c.out<T>(1, with_last(s, 1));
    B::rmsnorm_quant(c, c.in<T>(0), static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), c.in<T>(1), eps,
                     rows, k, q, sc, static_cast<T*>(nullptr));
  }
};

template <typename T, typename B>
struct SkipRMSNormQuantKernel {
  static constexpr const char* kName = "SkipRMSNormQuant";
  static constexpr const char* kInputs = "TTTT";  // X, skip, gamma, bias
  static constexpr size_t kRequired = 3;
  static constexpr const char* kOutputs = "qTT";  // Xq, scale, X + skip (+ bias)
  float eps;
  explicit SkipRMSNormQuantKernel(const OrtKernelInfo* info) : eps(float_attr(info, "epsilon", 1e-6f)) {}
  void Compute(Call& c) {
    auto [rows, k] = c.rows_k(0, kName);
    require(c.shape(1) == c.shape(0), "SkipRMSNormQuant: skip must have the shape of X");
    c.expect_vector(2, k, kName, "gamma");
    c.expect_vector(3, k, kName, "bias");
    auto s = c.shape(0);
    auto* q = c.out<int8_t>(0, s);
    auto* sc = c.out<T>(1, with_last(s, 1));
    auto* sum = c.out<T>(2, s);
    B::rmsnorm_quant(c, c.in<T>(0), c.in<T>(1), c.in<T>(3), c.in<T>(2), eps, rows, k, q, sc, sum);
  }
};

template <typename T, typename B>
struct LayerNormQuantKernel {
  static constexpr const char* kName = "LayerNormQuant";
  static constexpr const char* kInputs = "TTT";  // X, gamma, beta
  static constexpr size_t kRequired = 2;
  static constexpr const char* kOutputs = "qT";
  float eps;
  explicit LayerNormQuantKernel(const OrtKernelInfo* info) : eps(float_attr(info, "epsilon", 1e-5f)) {}
  void Compute(Call& c) {
    auto [rows, k] = c.rows_k(0, kName);
    c.expect_vector(1, k, kName, "gamma");
    c.expect_vector(2, k, kName, "beta");
    auto s = c.shape(0);
    auto* q = c.out<int8_t>(0, s);
    auto* sc = c.out<T>(1, with_last(s, 1));
    B::layernorm_quant(c, c.in<T>(0), c.in<T>(1), c.in<T>(2), eps, rows, k, q, sc);
  }
};

template <typename T, typename B>
struct Int8MatMulDequantKernel {
  static constexpr const char* kName = "Int8MatMulDequant";
  static constexpr const char* kInputs = "qTqTT";  // Xq [..., K], x_scale [..., 1], Wq [N, K], w_scale [N], bias
  static constexpr size_t kRequired = 4;
  static constexpr const char* kOutputs = "T";
  typename B::GemmWeights weights;  // what the backend makes of a constant Wq once, at session creation
  explicit Int8MatMulDequantKernel(const OrtKernelInfo* info) : weights(B::gemm_weights(info)) {}
  void Compute(Call& c) {
    auto [m, k] = c.rows_k(0, kName);
    auto ws = c.shape(2);
    require(ws.size() == 2 && ws[1] == k,
            "Int8MatMulDequant: Wq must be [N, K] with K = the last dimension of Xq (" + std::to_string(k) + ")");
    int64_t n = ws[0];
    require(c.shape(1) == with_last(c.shape(0), 1), "Int8MatMulDequant: x_scale must be Xq's shape with last dim 1");
    require(c.shape(3).size() == 1 && c.shape(3)[0] == n, "Int8MatMulDequant: w_scale must be [N]");
    if (c.has(4)) require(c.shape(4).size() == 1 && c.shape(4)[0] == n, "Int8MatMulDequant: bias must be [N]");
    auto* y = c.out<T>(0, with_last(c.shape(0), n));
    B::int8_matmul_dequant(c, weights, c.in<int8_t>(0), c.in<T>(1), c.in<int8_t>(2), c.in<T>(3), c.in<T>(4), m, n, k,
                           y);
  }
};

// A kernel with ORT's status-returning entry point: exceptions become statuses, never cross the C ABI.
template <typename K>
struct Wrapped : K {
  explicit Wrapped(const OrtKernelInfo* info) : K(info) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Call call(context);
      this->Compute(call);
      return nullptr;
    } catch (const BadInput& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

// ORT's view of a Kernel<T, B>: name, EP, types from the kernel's signature strings ('T' = activation type,
// 'q' = int8, 'u' = uint8), optional inputs after kRequired, and status-returning create/compute.
template <typename K, typename T>
struct Op : Ort::CustomOpBase<Op<K, T>, Wrapped<K>, true> {
  const char* ep;
  explicit Op(const char* ep_name) : ep(ep_name) {}
  static ONNXTensorElementDataType code(char c) {
    if (c == 'q') return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    return c == 'u' ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : onnx_type<T>();
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Wrapped<K>(info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, e.what());
    }
  }
  const char* GetName() const { return K::kName; }
  const char* GetExecutionProviderType() const { return ep; }
  size_t GetInputTypeCount() const { return std::char_traits<char>::length(K::kInputs); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return code(K::kInputs[i]); }
  size_t GetOutputTypeCount() const { return std::char_traits<char>::length(K::kOutputs); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return code(K::kOutputs[i]); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < K::kRequired ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

template <template <typename, typename> class K, typename B>
void add_both_types(std::vector<const OrtCustomOp*>& ops, const char* ep) {
  static Op<K<float, B>, float> f32(ep);
  static Op<K<half_t, B>, half_t> f16(ep);
  ops.push_back(&f32);
  ops.push_back(&f16);
}

// Every op, float32 and float16, on Backend B for execution provider ep (nullptr = CPU).
template <typename B>
std::vector<const OrtCustomOp*> all_ops(const char* ep) {
  std::vector<const OrtCustomOp*> ops;
  add_both_types<QuantizePerTokenKernel, B>(ops, ep);
  add_both_types<RMSNormQuantKernel, B>(ops, ep);
  add_both_types<SkipRMSNormQuantKernel, B>(ops, ep);
  add_both_types<LayerNormQuantKernel, B>(ops, ep);
  add_both_types<Int8MatMulDequantKernel, B>(ops, ep);
  return ops;
}

}  // namespace sq
