// CUDA kernels; see cuda_kernels.h. T is float or __half (sq::half_t on the host side, same bits).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu_kernels.h"
#include "cuda_kernels.h"
#ifdef SQ_ONNX_WITH_SM90_GEMM
#include "cuda_gemm_sm90.h"
#endif

namespace sq {
namespace cuda {
namespace {

constexpr float kEps = 1e-12f;
// CUDA's limit on grid.y; the CPU emulation of the tests sets a small one to run the multi-launch paths.
#ifndef SQ_ONNX_CUDA_MAX_GRID_Y
#define SQ_ONNX_CUDA_MAX_GRID_Y 65535
#endif
constexpr int64_t kMaxGridY = SQ_ONNX_CUDA_MAX_GRID_Y;

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ float round_t(float v, const float*) { return v; }
__device__ __forceinline__ float round_t(float v, const __half*) { return __half2float(__float2half_rn(v)); }

template <typename R>
__device__ R block_reduce(R v, R (*op)(R, R), R identity, R* shared) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // shared may still be read from a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : identity;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ double add_d(double a, double b) { return a + b; }
__device__ float max_f(float a, float b) { return fmaxf(a, b); }

// Per-token quantization of the float row value(j), j in [0, k): writes q and the stored scale.
template <typename T, class Value>
__device__ void quantize_row(Value value, int64_t k, int8_t* q, T* scale, float* red) {
  float amax = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) amax = fmaxf(amax, fabsf(value(j)));
  amax = block_reduce<float>(amax, max_f, 0.0f, red);
  float sf = round_t(fmaxf(amax, kEps) / 127.0f, static_cast<const T*>(nullptr));
  if (threadIdx.x == 0) store_f(scale, 0, sf);
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    float r = sf > 0.0f ? rintf(__fdiv_rn(value(j), sf)) : 0.0f;
    q[j] = static_cast<int8_t>(fminf(127.0f, fmaxf(-127.0f, r)));
  }
}

// The operands of one row op. mode 0: quantize (optionally times smooth_inv); 1: RMSNorm (+ skip/bias);
// 2: LayerNorm.
template <typename T>
struct RowArgs {
  const T *x, *skip, *bias, *gamma, *beta, *smooth_inv;
  float eps;
  int64_t k;
  int8_t* q;
  T *scale, *sum_out;
};

// Element j of the row before the norm: x (times smooth_inv), or for RMSNorm with skip the residual sum
// rounded to T (stored to sum_out when `store_sum`).
template <typename T, int kMode>
__device__ __forceinline__ float row_input(const RowArgs<T>& a, int64_t row, int64_t j, bool store_sum) {
  float v = load_f(a.x, row * a.k + j);
  if (kMode == 0 && a.smooth_inv) v = __fmul_rn(v, load_f(a.smooth_inv, j));
  if (kMode == 1 && a.skip) {
    float s = __fadd_rn(v, load_f(a.skip, row * a.k + j));
    if (a.bias) s = __fadd_rn(s, load_f(a.bias, j));
    if (store_sum && a.sum_out) store_f(a.sum_out, row * a.k + j, s);
    v = round_t(s, static_cast<const T*>(nullptr));
  }
  return v;
}

// The norm's statistics of a row: RMSNorm 1/rms; LayerNorm the mean and 1/std.
struct RowStats {
  float mean, inv;
};

// Element j after the norm, from its input v.
template <typename T, int kMode>
__device__ __forceinline__ float row_output(const RowArgs<T>& a, float v, int64_t j, RowStats st) {
  if (kMode == 1) return __fmul_rn(__fmul_rn(v, st.inv), load_f(a.gamma, j));
  if (kMode == 2) {
    float y = __fmul_rn(__fmul_rn(__fsub_rn(v, st.mean), st.inv), load_f(a.gamma, j));
    return a.beta ? __fadd_rn(y, load_f(a.beta, j)) : y;
  }
  return v;
}

// The statistics from input(j) (read once for RMSNorm, twice for LayerNorm), summed in double.
template <int kMode, class Input>
__device__ RowStats row_stats(Input input, int64_t k, float eps, double* red) {
  RowStats st{0.0f, 1.0f};
  if (kMode == 0) return st;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    float v = input(j, true);
    acc += kMode == 1 ? static_cast<double>(v) * static_cast<double>(v) : static_cast<double>(v);
  }
  double s = block_reduce<double>(acc, add_d, 0.0, red);
  float first = k > 0 ? static_cast<float>(s / static_cast<double>(k)) : 0.0f;
  if (kMode == 1) {
    st.inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(first, eps)));
    return st;
  }
  st.mean = first;
  double ss = 0.0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    float d = __fsub_rn(input(j, false), st.mean);
    ss += static_cast<double>(d) * static_cast<double>(d);
  }
  ss = block_reduce<double>(ss, add_d, 0.0, red);
  float var = k > 0 ? static_cast<float>(ss / static_cast<double>(k)) : 0.0f;
  st.inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
  return st;
}

// One block per row. kCached: the row lives in shared memory (k floats) between the passes, so each input
// is read once. Otherwise (rows longer than the device's shared memory) every pass reads the inputs again
// and recomputes the same values, bit for bit.
template <typename T, int kMode, bool kCached>
__global__ void row_kernel(RowArgs<T> a) {
  extern __shared__ float v[];
  __shared__ double red_d[32];
  __shared__ float red_f[32];
  const int64_t row = blockIdx.x, k = a.k;
  if (kCached) {
    auto input = [&](int64_t j, bool first) {
      if (first) v[j] = row_input<T, kMode>(a, row, j, true);
      return v[j];
    };
    if (kMode == 0)
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) input(j, true);  // row_stats reads nothing here
    RowStats st = row_stats<kMode>(input, k, a.eps, red_d);
    if (kMode != 0)
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) v[j] = row_output<T, kMode>(a, v[j], j, st);
    __syncthreads();  // each thread wrote its own elements; the quantization reads them all
    quantize_row<T>([&](int64_t j) { return v[j]; }, k, a.q + row * k, a.scale + row, red_f);
  } else {
    auto input = [&](int64_t j, bool first) { return row_input<T, kMode>(a, row, j, first); };
    RowStats st = row_stats<kMode>(input, k, a.eps, red_d);
    auto value = [&](int64_t j) { return row_output<T, kMode>(a, input(j, false), j, st); };
    quantize_row<T>(value, k, a.q + row * k, a.scale + row, red_f);
  }
}

// The most dynamic shared memory a block of `kernel` may have on the current device; asked once per device
// (the first 16), as rows of 12K-58K floats would ask on every launch.
template <typename K>
size_t max_dynamic_smem(K kernel) {
  constexpr size_t kDefault = 48 * 1024 - 512;
  static std::atomic<size_t> known[16] = {};  // limit + 1 per device; 0 = not asked yet
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return kDefault;
  }
  if (dev >= 0 && dev < 16) {
    if (size_t v = known[dev].load(std::memory_order_relaxed)) return v - 1;
  }
  cudaFuncAttributes attr{};
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return kDefault;
  }
  const size_t limit =
      optin > static_cast<int>(attr.sharedSizeBytes) ? static_cast<size_t>(optin) - attr.sharedSizeBytes : 0;
  if (dev >= 0 && dev < 16) known[dev].store(limit + 1, std::memory_order_relaxed);
  return limit;
}

template <typename T, int kMode>
void launch_rows(const char* name, const RowArgs<T>& a, int64_t rows, void* stream) {
  if (rows <= 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  int threads = a.k >= 2048 ? 512 : (a.k >= 512 ? 256 : 128);
  size_t smem = static_cast<size_t>(a.k) * sizeof(float);
  if (smem <= 48 * 1024 - 512) {
    row_kernel<T, kMode, true><<<static_cast<unsigned>(rows), threads, smem, st>>>(a);
  } else if (smem <= max_dynamic_smem(row_kernel<T, kMode, true>)) {
    cudaFuncSetAttribute(row_kernel<T, kMode, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
    row_kernel<T, kMode, true><<<static_cast<unsigned>(rows), threads, smem, st>>>(a);
  } else {
    row_kernel<T, kMode, false><<<static_cast<unsigned>(rows), threads, 0, st>>>(a);
  }
  check_launch(name);
}

// ---- int8 GEMM with dequantizing epilogue ------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void epilogue_store(T* y, const T* xs, const T* ws, const T* bias, int64_t m, int64_t n,
                                               int64_t row, int64_t col, int32_t acc) {
  if (row >= m || col >= n) return;
  float v = __fmul_rn(static_cast<float>(acc), __fmul_rn(load_f(xs, row), load_f(ws, col)));
  if (bias) v = __fadd_rn(v, load_f(bias, col));
  store_f(y, row * n + col, v);
}

// Any shape and alignment: one thread per output, byte loads. Used when the fast paths cannot be.
template <typename T>
__global__ void gemm_generic(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws, const T* bias, int64_t m,
                             int64_t n, int64_t k, T* y) {
  int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= n) return;
  for (int64_t row = blockIdx.y; row < m; row += gridDim.y) {
    int32_t acc = 0;
    for (int64_t p = 0; p < k; ++p) acc += static_cast<int32_t>(xq[row * k + p]) * static_cast<int32_t>(wq[col * k + p]);
    epilogue_store(y, xs, ws, bias, m, n, row, col, acc);
  }
}

// Few rows (decode): each warp streams kSkinnyCols rows of W once with 16-byte loads and dp4a, reusing each
// 16-byte chunk of X across them, for up to kSkinnyRows rows of X. Needs K % 16 == 0 and 16-byte aligned rows.
// One column per warp above 4 rows: more warps in flight beat the reuse of X (an L1 hit anyway).
constexpr int kSkinnyRows = 16;
template <typename T, int kSkinnyCols>
__global__ void gemm_skinny(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws, const T* bias, int64_t m,
                            int64_t n, int64_t k, T* y) {
  const int64_t col0 = (blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32) * kSkinnyCols;
  const int lane = threadIdx.x % 32;
  if (col0 >= n) return;
  int32_t acc[kSkinnyRows][kSkinnyCols];
#pragma unroll
  for (int i = 0; i < kSkinnyRows; ++i)
#pragma unroll
    for (int j = 0; j < kSkinnyCols; ++j) acc[i][j] = 0;
  const int64_t chunks = k / 16;
  for (int64_t c = lane; c < chunks; c += 32) {
    int4 w[kSkinnyCols];
#pragma unroll
    for (int j = 0; j < kSkinnyCols; ++j)
      w[j] = col0 + j < n ? __ldg(reinterpret_cast<const int4*>(wq + (col0 + j) * k) + c) : make_int4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < kSkinnyRows; ++i) {
      if (i < m) {
        int4 a = __ldg(reinterpret_cast<const int4*>(xq + i * k) + c);
#pragma unroll
        for (int j = 0; j < kSkinnyCols; ++j) {
          acc[i][j] = __dp4a(a.x, w[j].x, acc[i][j]);
          acc[i][j] = __dp4a(a.y, w[j].y, acc[i][j]);
          acc[i][j] = __dp4a(a.z, w[j].z, acc[i][j]);
          acc[i][j] = __dp4a(a.w, w[j].w, acc[i][j]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kSkinnyRows; ++i) {
    if (i < m) {
#pragma unroll
      for (int j = 0; j < kSkinnyCols; ++j) {
        int32_t s = acc[i][j];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) epilogue_store(y, xs, ws, bias, m, n, static_cast<int64_t>(i), col0 + j, s);
      }
    }
  }
}

// Tensor-core tiles: block BM x BN x 64 (K bytes), 8 warps as 2 x 4, each warp (BM/2) x (BN/4) in
// m16n8k32 s8 mma.sync steps; A and B tiles stream through kStages shared-memory stages by cp.async,
// rows padded to 80 bytes (conflict-free ldmatrix). Rows past M or N and K past its end are zero-filled.
constexpr int kBK = 64, kStages = 3, kRowBytes = 80, kThreads = 256;

// The PTX used below. tests/cuda_emulation/ replaces these (SQ_ONNX_CUDA_ON_CPU) with warp-collective
// versions that follow the same fragment layouts, so the kernels' own source also runs on a CPU.
#ifndef SQ_ONNX_CUDA_ON_CPU
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void mma_s8(int32_t* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
#endif

template <int kBM, int kBN>
__device__ __forceinline__ void load_tile(const int8_t* xq, const int8_t* wq, int64_t m, int64_t n, int64_t k,
                                          int64_t m0, int64_t n0, int64_t k0, uint8_t* sa, uint8_t* sb) {
  for (int c = threadIdx.x; c < (kBM + kBN) * (kBK / 16); c += kThreads) {
    bool is_a = c < kBM * (kBK / 16);
    int cc = is_a ? c : c - kBM * (kBK / 16);
    int r = cc / (kBK / 16), chunk = cc % (kBK / 16);
    int64_t grow = (is_a ? m0 : n0) + r, gk = k0 + chunk * 16;
    bool ok = grow < (is_a ? m : n) && gk < k;
    const int8_t* base = is_a ? xq : wq;
    const int8_t* src = ok ? base + grow * k + gk : base;
    cp_async16(smem_addr((is_a ? sa : sb) + r * kRowBytes + chunk * 16), src, ok ? 16 : 0);
  }
}

template <typename T, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads) gemm_mma(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws,
                                                     const T* bias, int64_t m, int64_t n, int64_t k, T* y) {
  constexpr int kWM = kBM / 2, kWN = kBN / 4, kMI = kWM / 16, kNI = kWN / 8;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* sa = smem;                                  // kStages x kBM rows
  uint8_t* sb = smem + kStages * kBM * kRowBytes;      // kStages x kBN rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t tiles = (k + kBK - 1) / kBK;

  int32_t acc[kMI][kNI][4];
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < kNI; ++j)
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[i][j][t] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load_tile<kBM, kBN>(xq, wq, m, n, k, m0, n0, s * kBK, sa + s * kBM * kRowBytes, sb + s * kBN * kRowBytes);
    cp_async_commit();
  }
  for (int64_t t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    int64_t next = t + kStages - 1;
    if (next < tiles) {
      int st = static_cast<int>(next % kStages);
      load_tile<kBM, kBN>(xq, wq, m, n, k, m0, n0, next * kBK, sa + st * kBM * kRowBytes, sb + st * kBN * kRowBytes);
    }
    cp_async_commit();
    const uint8_t* a = sa + (t % kStages) * kBM * kRowBytes;
    const uint8_t* b = sb + (t % kStages) * kBN * kRowBytes;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t af[kMI][4];
#pragma unroll
      for (int i = 0; i < kMI; ++i) {
        int r = wm * kWM + i * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
        int col = kk + (lane / 16) * 16;
        ldmatrix_x4(smem_addr(a + r * kRowBytes + col), af[i][0], af[i][1], af[i][2], af[i][3]);
      }
      uint32_t bf[kNI][2];
#pragma unroll
      for (int p = 0; p < kNI / 2; ++p) {
        int i = lane / 8;
        int r = wn * kWN + p * 16 + (lane % 8) + (i >> 1) * 8;
        int col = kk + (i & 1) * 16;
        ldmatrix_x4(smem_addr(b + r * kRowBytes + col), bf[2 * p][0], bf[2 * p][1], bf[2 * p + 1][0], bf[2 * p + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < kMI; ++i)
#pragma unroll
        for (int j = 0; j < kNI; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();

  const int gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int i = 0; i < kMI; ++i) {
#pragma unroll
    for (int j = 0; j < kNI; ++j) {
      int64_t row = m0 + wm * kWM + i * 16 + gid;
      int64_t col = n0 + wn * kWN + j * 8 + tig * 2;
      epilogue_store(y, xs, ws, bias, m, n, row, col, acc[i][j][0]);
      epilogue_store(y, xs, ws, bias, m, n, row, col + 1, acc[i][j][1]);
      epilogue_store(y, xs, ws, bias, m, n, row + 8, col, acc[i][j][2]);
      epilogue_store(y, xs, ws, bias, m, n, row + 8, col + 1, acc[i][j][3]);
    }
  }
}

// Few rows (5-16) on tensor cores, opt-in (select_few_rows): Y^T = W X^T, so W's rows fill the 16-row side of
// m16n8k32 and the (at most 16) rows of X its 8-column side, twice. Each warp takes 32 columns of W and every
// kFewWarps-th 64-byte chunk of K (split-K within the block, summed through shared memory at the end); W is
// read once, in whole 16-byte loads. A lane loads the 16 bytes at K offset tig * 16 of its chunk and feeds
// them to two k32 steps as (bytes 0-3, 4-7) and (8-11, 12-15): a permutation of K, the same for W and X, so
// the sums are the same. Needs K % 16 == 0 and 16-byte aligned rows (rows past M or N and K past its end
// read as zeros).
constexpr int kFewWarps = 8, kFewCols = 32;
template <typename T>
__global__ void __launch_bounds__(kFewWarps * 32) gemm_few_rows_mma(const int8_t* xq, const T* xs, const int8_t* wq,
                                                                    const T* ws, const T* bias, int64_t m, int64_t n,
                                                                    int64_t k, T* y) {
  __shared__ int32_t partial[kFewWarps][32][17];  // 17: a lane's 16 sums on other banks than its neighbours
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kFewCols;
  int32_t acc[2][2][4] = {};  // [16 columns of W][8 rows of X][fragment]
  const int4 zero = make_int4(0, 0, 0, 0);
  const int64_t chunks = (k + 63) / 64;
#pragma unroll 2  // the next chunk's loads in flight during this one's mma
  for (int64_t c = warp; c < chunks; c += kFewWarps) {
    const int64_t kb = c * 64 + tig * 16;
    const bool in_k = kb < k;  // K % 16 == 0: a 16-byte piece is all in or all out
    int4 wv[2][2], xv[2];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t col = n0 + t * 16 + h * 8 + gid;
        wv[t][h] = in_k && col < n ? __ldg(reinterpret_cast<const int4*>(wq + col * k + kb)) : zero;
      }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t row = u * 8 + gid;
      xv[u] = in_k && row < m ? __ldg(reinterpret_cast<const int4*>(xq + row * k + kb)) : zero;
    }
#pragma unroll
    for (int step = 0; step < 2; ++step) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        // a0: W column gid, a1: column gid + 8 (K slots tig*4..); a2, a3: the same columns, slots 16 + tig*4..
        uint32_t a[4];
        a[0] = static_cast<uint32_t>(step == 0 ? wv[t][0].x : wv[t][0].z);
        a[1] = static_cast<uint32_t>(step == 0 ? wv[t][1].x : wv[t][1].z);
        a[2] = static_cast<uint32_t>(step == 0 ? wv[t][0].y : wv[t][0].w);
        a[3] = static_cast<uint32_t>(step == 0 ? wv[t][1].y : wv[t][1].w);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const uint32_t b0 = static_cast<uint32_t>(step == 0 ? xv[u].x : xv[u].z);
          const uint32_t b1 = static_cast<uint32_t>(step == 0 ? xv[u].y : xv[u].w);
          mma_s8(acc[t][u], a, b0, b1);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[warp][lane][(t * 2 + u) * 4 + r] = acc[t][u][r];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      int32_t sum[4] = {0, 0, 0, 0};
      for (int w = 0; w < kFewWarps; ++w)
#pragma unroll
        for (int r = 0; r < 4; ++r) sum[r] += partial[w][lane][(t * 2 + u) * 4 + r];
      // c0, c1: W column gid, X rows tig * 2 and + 1; c2, c3: column gid + 8.
      const int64_t col = n0 + t * 16 + gid, row = u * 8 + tig * 2;
      epilogue_store(y, xs, ws, bias, m, n, row, col, sum[0]);
      epilogue_store(y, xs, ws, bias, m, n, row + 1, col, sum[1]);
      epilogue_store(y, xs, ws, bias, m, n, row, col + 8, sum[2]);
      epilogue_store(y, xs, ws, bias, m, n, row + 1, col + 8, sum[3]);
    }
}

template <typename T, int kBM, int kBN>
void launch_mma(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws, const T* bias, int64_t m, int64_t n,
                int64_t k, T* y, cudaStream_t stream) {
  constexpr int smem = kStages * (kBM + kBN) * kRowBytes;
  static_assert(smem <= 99 * 1024, "sm_86/sm_89 GPUs (L4, L40S, A10, RTX) run the sm_80 build with 99 KB per block");
  cudaFuncSetAttribute(gemm_mma<T, kBM, kBN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  // Row tiles go in grid.y (at most kMaxGridY): more rows than that many tiles take several launches.
  constexpr int64_t kMaxRows = kMaxGridY * kBM;
  for (int64_t r = 0; r < m; r += kMaxRows) {
    int64_t rows = m - r < kMaxRows ? m - r : kMaxRows;
    dim3 grid(static_cast<unsigned>((n + kBN - 1) / kBN), static_cast<unsigned>((rows + kBM - 1) / kBM));
    gemm_mma<T, kBM, kBN><<<grid, kThreads, smem, stream>>>(xq + r * k, xs + r, wq, ws, bias, rows, n, k, y + r * n);
  }
}

int sm_count() {
  static int count = [] {
    int dev = 0, c = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev);
    return c > 0 ? c : 1;
  }();
  return count;
}

[[maybe_unused]] bool device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major == 9 && minor == 0;
}

// The GEMM for more than 4 rows. The CUTLASS Hopper kernel is opt-in (SQ_ONNX_CUDA_GEMM=sm90 or
// sq_onnx_cuda_select_gemm) until it has been checked and timed on a GPU; mma.sync is the measured default.
std::atomic<int> g_gemm_path{-1};
// A process-wide kernel choice: set by its select function, else read once from `var` (`opt_in` picks `chosen`).
int path_from_env(std::atomic<int>& path, const char* var, const char* opt_in, int chosen, int fallback) {
  int p = path.load(std::memory_order_relaxed);
  if (p < 0) {
    const char* env = std::getenv(var);
    p = env && std::strcmp(env, opt_in) == 0 ? chosen : fallback;
    path.store(p, std::memory_order_relaxed);
  }
  return p;
}
[[maybe_unused]] int gemm_path() { return path_from_env(g_gemm_path, "SQ_ONNX_CUDA_GEMM", "sm90", kGemmSm90, kGemmMma); }

// The GEMM for 5-16 rows: dp4a (the measured default) or the tensor-core kernel gemm_few_rows_mma, opt-in
// (SQ_ONNX_CUDA_FEW_ROWS=mma or sq_onnx_cuda_select_few_rows) until it has been checked and timed on a GPU.
std::atomic<int> g_few_rows_path{-1};
int few_rows_path() {
  return path_from_env(g_few_rows_path, "SQ_ONNX_CUDA_FEW_ROWS", "mma", kFewRowsMma, kFewRowsDp4a);
}

// Which kernel served the last int8 GEMM (kServed*), so tests can tell the Hopper path really ran.
std::atomic<int> g_last_served{0};

#ifdef SQ_ONNX_WITH_SM90_GEMM
// The Hopper kernel when selected, on an sm_90 device, for fp16; false (nothing launched) otherwise.
template <typename T>
bool run_sm90(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws, const T* bias, int64_t m, int64_t n,
              int64_t k, T* y, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half>) {
    return gemm_path() == kGemmSm90 && device_is_sm90() &&
           sm90_int8_matmul_dequant(xq, xs, wq, ws, bias, m, n, k, y, sm_count(), stream);
  } else {
    return false;
  }
}
#endif

}  // namespace

int last_gemm_kernel() { return g_last_served.load(std::memory_order_relaxed); }

bool sm90_gemm_available() {
#ifdef SQ_ONNX_WITH_SM90_GEMM
  return device_is_sm90();
#else
  return false;
#endif
}

bool select_few_rows(int path) {
  if (path != kFewRowsDp4a && path != kFewRowsMma) return false;
  g_few_rows_path.store(path, std::memory_order_relaxed);
  return true;
}

bool select_gemm(int path) {
  if (path != kGemmMma && path != kGemmSm90) return false;
  if (path == kGemmSm90 && !sm90_gemm_available()) return false;
  g_gemm_path.store(path, std::memory_order_relaxed);
  return true;
}

template <typename T>
void quantize_per_token(const T* x, const T* smooth_inv, int64_t rows, int64_t k, int8_t* q, T* scale, void* stream) {
  launch_rows<T, 0>("QuantizePerToken", {x, nullptr, nullptr, nullptr, nullptr, smooth_inv, 0.0f, k, q, scale, nullptr},
                    rows, stream);
}
template <typename T>
void rmsnorm_quant(const T* x, const T* skip, const T* bias, const T* gamma, float eps, int64_t rows, int64_t k,
                   int8_t* q, T* scale, T* sum_out, void* stream) {
  launch_rows<T, 1>("RMSNormQuant", {x, skip, bias, gamma, nullptr, nullptr, eps, k, q, scale, sum_out}, rows, stream);
}
template <typename T>
void layernorm_quant(const T* x, const T* gamma, const T* beta, float eps, int64_t rows, int64_t k, int8_t* q,
                     T* scale, void* stream) {
  launch_rows<T, 2>("LayerNormQuant", {x, nullptr, nullptr, gamma, beta, nullptr, eps, k, q, scale, nullptr}, rows,
                    stream);
}

template <typename T>
void int8_matmul_dequant(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws, const T* bias, int64_t m,
                         int64_t n, int64_t k, T* y, void* stream_ptr) {
  if (m <= 0 || n <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  bool aligned = k % 16 == 0 && reinterpret_cast<uintptr_t>(xq) % 16 == 0 && reinterpret_cast<uintptr_t>(wq) % 16 == 0;
  int served = kServedMma;
  if (!aligned || k == 0) {
    dim3 grid(static_cast<unsigned>((n + 127) / 128), static_cast<unsigned>(m < kMaxGridY ? m : kMaxGridY));
    gemm_generic<T><<<grid, 128, 0, stream>>>(xq, xs, wq, ws, bias, m, n, k, y);
    served = kServedGeneric;
  } else if (m <= 4) {
    gemm_skinny<T, 4><<<static_cast<unsigned>((n + 31) / 32), 256, 0, stream>>>(xq, xs, wq, ws, bias, m, n, k, y);
    served = kServedSkinny;
#ifdef SQ_ONNX_WITH_SM90_GEMM
  } else if (run_sm90(xq, xs, wq, ws, bias, m, n, k, y, stream)) {
    served = kServedSm90;  // from 5 rows when selected; shapes CUTLASS cannot take fall through below
#endif
  } else if (m <= kSkinnyRows && few_rows_path() == kFewRowsMma) {
    gemm_few_rows_mma<T><<<static_cast<unsigned>((n + kFewCols - 1) / kFewCols), kFewWarps * 32, 0, stream>>>(
        xq, xs, wq, ws, bias, m, n, k, y);
    served = kServedFewRowsMma;
  } else if (m <= kSkinnyRows) {
    gemm_skinny<T, 1><<<static_cast<unsigned>((n + 7) / 8), 256, 0, stream>>>(xq, xs, wq, ws, bias, m, n, k, y);
    served = kServedSkinny;
  } else if (((m + 127) / 128) * ((n + 255) / 256) >= sm_count()) {
    launch_mma<T, 128, 256>(xq, xs, wq, ws, bias, m, n, k, y, stream);
  } else if (((m + 127) / 128) * ((n + 127) / 128) >= sm_count()) {
    launch_mma<T, 128, 128>(xq, xs, wq, ws, bias, m, n, k, y, stream);
  } else {
    launch_mma<T, 64, 128>(xq, xs, wq, ws, bias, m, n, k, y, stream);
  }
  g_last_served.store(served, std::memory_order_relaxed);
  check_launch("Int8MatMulDequant");
}

#define SQ_CUDA_INSTANTIATE(T)                                                                                   \
  template void quantize_per_token<T>(const T*, const T*, int64_t, int64_t, int8_t*, T*, void*);                 \
  template void rmsnorm_quant<T>(const T*, const T*, const T*, const T*, float, int64_t, int64_t, int8_t*, T*, T*, \
                                 void*);                                                                         \
  template void layernorm_quant<T>(const T*, const T*, const T*, float, int64_t, int64_t, int8_t*, T*, void*);    \
  template void int8_matmul_dequant<T>(const int8_t*, const T*, const int8_t*, const T*, const T*, int64_t,      \
                                       int64_t, int64_t, T*, void*);
SQ_CUDA_INSTANTIATE(float)
SQ_CUDA_INSTANTIATE(__half)

// The host side names fp16 sq::half_t (same bits as __half): forward to the __half kernels.
namespace {
const __half* h(const half_t* p) { return reinterpret_cast<const __half*>(p); }
__half* h(half_t* p) { return reinterpret_cast<__half*>(p); }
}  // namespace
template <>
void quantize_per_token<half_t>(const half_t* x, const half_t* si, int64_t rows, int64_t k, int8_t* q, half_t* s,
                                void* st) {
  quantize_per_token<__half>(h(x), h(si), rows, k, q, h(s), st);
}
template <>
void rmsnorm_quant<half_t>(const half_t* x, const half_t* skip, const half_t* bias, const half_t* g, float eps,
                           int64_t rows, int64_t k, int8_t* q, half_t* s, half_t* sum, void* st) {
  rmsnorm_quant<__half>(h(x), h(skip), h(bias), h(g), eps, rows, k, q, h(s), h(sum), st);
}
template <>
void layernorm_quant<half_t>(const half_t* x, const half_t* g, const half_t* b, float eps, int64_t rows, int64_t k,
                             int8_t* q, half_t* s, void* st) {
  layernorm_quant<__half>(h(x), h(g), h(b), eps, rows, k, q, h(s), st);
}
template <>
void int8_matmul_dequant<half_t>(const int8_t* xq, const half_t* xs, const int8_t* wq, const half_t* ws,
                                 const half_t* bias, int64_t m, int64_t n, int64_t k, half_t* y, void* st) {
  int8_matmul_dequant<__half>(xq, h(xs), wq, h(ws), h(bias), m, n, k, h(y), st);
}

}  // namespace cuda
}  // namespace sq

// ---- C entry points for tests and tools/ (device pointers, the caller's stream; 0 = success) -------------
namespace {
template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}
}  // namespace

#ifdef SQ_ONNX_TEST_HOOKS  // the C entry points below are for tests/ and tools/bench_cuda_kernels.py
#define SQ_EXPORT extern "C" __attribute__((visibility("default")))

SQ_EXPORT int sq_onnx_cuda_int8_matmul_dequant(int half, const int8_t* xq, const void* xs, const int8_t* wq,
                                               const void* ws, const void* bias, int64_t m, int64_t n, int64_t k,
                                               void* y, void* stream) {
  return guarded([&] {
    if (half)
      sq::cuda::int8_matmul_dequant<__half>(xq, static_cast<const __half*>(xs), wq, static_cast<const __half*>(ws),
                                            static_cast<const __half*>(bias), m, n, k, static_cast<__half*>(y), stream);
    else
      sq::cuda::int8_matmul_dequant<float>(xq, static_cast<const float*>(xs), wq, static_cast<const float*>(ws),
                                           static_cast<const float*>(bias), m, n, k, static_cast<float*>(y), stream);
  });
}

// 5-16 rows: 1 dp4a (the default), 2 the tensor-core few-rows kernel. Returns 0 when taken, 1 for another path.
SQ_EXPORT int sq_onnx_cuda_select_few_rows(int path) { return sq::cuda::select_few_rows(path) ? 0 : 1; }
// 1: mma.sync (the default), 2: the CUTLASS Hopper kernel. Returns 0 when taken, 1 when that path is not built
// into this library or the current device is not compute capability 9.0.
SQ_EXPORT int sq_onnx_cuda_select_gemm(int path) { return sq::cuda::select_gemm(path) ? 0 : 1; }
// Whether the Hopper kernel would take an fp16 M x N x K problem (host-side checks only, no GPU needed): 0 yes,
// 1 no (our preconditions), 2 no (CUTLASS's checks), -1 not built into this library.
SQ_EXPORT int sq_onnx_cuda_sm90_accepts(int64_t m, int64_t n, int64_t k) {
#ifdef SQ_ONNX_WITH_SM90_GEMM
  return sq::cuda::sm90_accepts(m, n, k, 132);
#else
  return -1;
#endif
}
// The kernel that served the last int8 GEMM: 1 generic, 2 dp4a (few rows), 3 mma.sync, 4 CUTLASS Hopper,
// 5 mma.sync for few rows.
SQ_EXPORT int sq_onnx_cuda_last_gemm_kernel() { return sq::cuda::last_gemm_kernel(); }

SQ_EXPORT int sq_onnx_cuda_rmsnorm_quant(int half, const void* x, const void* skip, const void* bias, const void* gamma,
                                         float eps, int64_t rows, int64_t k, int8_t* q, void* scale, void* sum_out,
                                         void* stream) {
  return guarded([&] {
    if (half)
      sq::cuda::rmsnorm_quant<__half>(static_cast<const __half*>(x), static_cast<const __half*>(skip),
                                      static_cast<const __half*>(bias), static_cast<const __half*>(gamma), eps, rows, k,
                                      q, static_cast<__half*>(scale), static_cast<__half*>(sum_out), stream);
    else
      sq::cuda::rmsnorm_quant<float>(static_cast<const float*>(x), static_cast<const float*>(skip),
                                     static_cast<const float*>(bias), static_cast<const float*>(gamma), eps, rows, k, q,
                                     static_cast<float*>(scale), static_cast<float*>(sum_out), stream);
  });
}

SQ_EXPORT int sq_onnx_cuda_layernorm_quant(int half, const void* x, const void* gamma, const void* beta, float eps,
                                           int64_t rows, int64_t k, int8_t* q, void* scale, void* stream) {
  return guarded([&] {
    if (half)
      sq::cuda::layernorm_quant<__half>(static_cast<const __half*>(x), static_cast<const __half*>(gamma),
                                        static_cast<const __half*>(beta), eps, rows, k, q, static_cast<__half*>(scale),
                                        stream);
    else
      sq::cuda::layernorm_quant<float>(static_cast<const float*>(x), static_cast<const float*>(gamma),
                                       static_cast<const float*>(beta), eps, rows, k, q, static_cast<float*>(scale),
                                       stream);
  });
}

SQ_EXPORT int sq_onnx_cuda_quantize_per_token(int half, const void* x, const void* smooth_inv, int64_t rows, int64_t k,
                                              int8_t* q, void* scale, void* stream) {
  return guarded([&] {
    if (half)
      sq::cuda::quantize_per_token<__half>(static_cast<const __half*>(x), static_cast<const __half*>(smooth_inv), rows,
                                           k, q, static_cast<__half*>(scale), stream);
    else
      sq::cuda::quantize_per_token<float>(static_cast<const float*>(x), static_cast<const float*>(smooth_inv), rows, k,
                                          q, static_cast<float*>(scale), stream);
  });
}
#endif  // SQ_ONNX_TEST_HOOKS
