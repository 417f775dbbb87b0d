// CPU backend of the sq_onnx ops: the reference kernels of cpu_kernels.cc, run on ORT's intra-op threads.
#include "ops_cpu.h"

#include <cmath>
#include <memory>

#include "cpu_attention.h"
#include "cpu_nbits_a8.h"
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

inline int64_t int_attr(const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  if (OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v)) {
    Ort::GetApi().ReleaseStatus(st);
    throw BadInput(std::string("MatMulNBitsA8: attribute ") + name + " is required");
  }
  return v;
}

// MatMulNBits (4 or 8 bits, no g_idx) at accuracy_level 4's arithmetic on the kernel of cpu_nbits_a8.h: the same inputs
// and attributes, so a pass swaps the op type and the domain and nothing else. Constant weights (initializers)
// are repacked once, here; others on every call.
struct MatMulNBitsA8Kernel {
  static constexpr const char* kName = "MatMulNBitsA8";
  static constexpr const char* kInputs = "TuTuT";  // A [..., K], B [N, blocks, block / 2], scales, zero_points, bias
  static constexpr size_t kRequired = 3;
  static constexpr const char* kOutputs = "T";
  int64_t k, n, block, bits = 4;
  std::shared_ptr<const NBitsPacked> packed;
  explicit MatMulNBitsA8Kernel(const OrtKernelInfo* info)
      : k(int_attr(info, "K")), n(int_attr(info, "N")), block(int_attr(info, "block_size")) {
    require(k > 0 && n > 0, "MatMulNBitsA8: K and N must be positive");
    require(block >= 8 && block % 8 == 0, "MatMulNBitsA8: block_size must be a multiple of 8");
    if (OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, "bits", &bits)) Ort::GetApi().ReleaseStatus(st);
    require(bits == 4 || bits == 8, "MatMulNBitsA8: bits must be 4 or 8");
    try {
      Ort::ConstKernelInfo ki(info);
      int is_b = 0, is_s = 0, is_z = 0;
      Ort::ConstValue b = ki.GetTensorConstantInput(1, &is_b);
      Ort::ConstValue s = ki.GetTensorConstantInput(2, &is_s);
      const bool has_z = ki.GetInputCount() > 3 && !ki.GetInputName(3).empty();
      Ort::ConstValue z = has_z ? ki.GetTensorConstantInput(3, &is_z) : Ort::ConstValue{nullptr};
      if (is_b && is_s && (!has_z || is_z)) packed = pack(b.GetTensorData<uint8_t>(), s.GetTensorData<float>(),
                                                          has_z ? z.GetTensorData<uint8_t>() : nullptr);
    } catch (const std::exception&) {
      packed = nullptr;  // packed on each call instead
    }
  }
  std::shared_ptr<const NBitsPacked> pack(const uint8_t* b, const float* s, const uint8_t* z) const {
    return pack_nbits(b, s, z, n, k, block, bits);
  }
  void Compute(Call& c) {
    auto [m, ka] = c.rows_k(0, kName);
    require(ka == k, "MatMulNBitsA8: the last dimension of A must be K (" + std::to_string(k) + ")");
    const int64_t blocks = (k + block - 1) / block;
    require(c.shape(1) == std::vector<int64_t>{n, blocks, block * bits / 8},
            "MatMulNBitsA8: B must be [N, blocks, block_size * bits / 8]");
    require(c.ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetElementCount() == static_cast<size_t>(n * blocks),
            "MatMulNBitsA8: scales must hold N x blocks values");
    if (c.has(3))
      require(c.ctx.GetInput(3).GetTensorTypeAndShapeInfo().GetElementCount() ==
                  static_cast<size_t>(n * ((blocks * bits + 7) / 8)),
              "MatMulNBitsA8: zero_points must be uint8 [N, ceil(blocks * bits / 8)]");
    if (c.has(4)) require(c.shape(4) == std::vector<int64_t>{n}, "MatMulNBitsA8: bias must be [N]");
    auto w = packed ? packed : pack(c.in<uint8_t>(1), c.in<float>(2), c.in<uint8_t>(3));
    float* y = c.out<float>(0, with_last(c.shape(0), n));
    nbits_a8_matmul(c.in<float>(0), m, *w, c.in<float>(4), y, ort_parallel_for(c));
  }
};

// softmax(scale * Q K^T + mask) V with the keys a causal mask removes skipped (cpu_attention.h): what an exported
// decoder's MatMul, Mul, Add, Softmax, MatMul compute, in one op (passes/fuse_masked_attention.py).
struct MaskedAttentionKernel {
  static constexpr const char* kName = "MaskedAttention";
  static constexpr const char* kInputs = "TTTT";  // Q [B, H, S, D], K and V [B, Hk, T, D], mask [.., S or 1, T]
  static constexpr size_t kRequired = 3;
  static constexpr const char* kOutputs = "T";  // [B, H, S, D]
  float scale;
  explicit MaskedAttentionKernel(const OrtKernelInfo* info) : scale(float_attr(info, "scale", 0.0f)) {
    require(scale != 0.0f && std::isfinite(scale), "MaskedAttention: attribute scale (non-zero) is required");
  }
  void Compute(Call& c) {
    const auto q = c.shape(0), k = c.shape(1), v = c.shape(2);
    require(q.size() == 4 && k.size() == 4, "MaskedAttention: Q, K and V must be [batch, heads, sequence, head size]");
    require(v == k, "MaskedAttention: V must have K's shape");
    require(k[0] == q[0] && k[3] == q[3], "MaskedAttention: K must have Q's batch and head size");
    require(k[1] > 0 && q[1] % k[1] == 0, "MaskedAttention: Q's heads must be a multiple of K's");
    AttentionShape s;
    s.batch = q[0], s.heads = q[1], s.kv_heads = k[1], s.q_len = q[2], s.kv_len = k[2], s.head_size = q[3];
    if (c.has(3)) {
      auto m = c.shape(3);
      require(m.size() >= 1 && m.size() <= 4 && m.back() == s.kv_len,
              "MaskedAttention: the mask's last dimension must be K's sequence length");
      m.insert(m.begin(), 4 - m.size(), 1);
      require((m[0] == 1 || m[0] == s.batch) && (m[1] == 1 || m[1] == s.heads) && (m[2] == 1 || m[2] == s.q_len),
              "MaskedAttention: the mask must broadcast to [batch, heads, Q's sequence length, K's]");
      s.mask_batch = m[0], s.mask_heads = m[1], s.mask_rows = m[2];
    }
    float* out = c.out<float>(0, q);
    masked_attention(c.in<float>(0), c.in<float>(1), c.in<float>(2), c.in<float>(3), s, scale, out,
                     ort_parallel_for(c));
  }
};

}  // namespace

std::vector<const OrtCustomOp*> cpu_ops() {
  auto ops = all_ops<CpuBackend>(nullptr);
  static Op<MatMulNBitsA8Kernel, float> nbits_a8(nullptr);  // float32 A only
  ops.push_back(&nbits_a8);
  static Op<MaskedAttentionKernel, float> attention(nullptr);  // float32 only
  ops.push_back(&attention);
  return ops;
}

}  // namespace sq
