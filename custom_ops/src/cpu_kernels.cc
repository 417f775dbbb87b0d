// CPU kernels; see cpu_kernels.h for the arithmetic they define.
#include "cpu_kernels.h"

#include "cpu_gemm_vnni.h"
#include "cpu_isa.h"
#include "cpu_row_loops.h"
#include "cpu_simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SQ_X86 1
#endif

namespace sq {

float to_float(float v) { return v; }

float to_float(half_t h) {
  uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  uint32_t f;
  if (exp == 0) {
    float v = static_cast<float>(mant) * (1.0f / 16777216.0f);  // subnormal: mant * 2^-24
    std::memcpy(&f, &v, 4);
    f |= sign;
  } else if (exp == 31) {
    f = sign | 0x7f800000u | (mant << 13);
  } else {
    f = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

template <>
float from_float<float>(float v) {
  return v;
}

// Round-to-nearest-even float -> binary16 (as numpy's astype(float16)).
template <>
half_t from_float<half_t>(float fl) {
  const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  float denorm_magic;
  std::memcpy(&denorm_magic, &denorm_magic_u, 4);
  uint32_t f;
  std::memcpy(&f, &fl, 4);
  uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16max) {
    o = f > f32infty ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {
    float ff;
    std::memcpy(&ff, &f, 4);
    ff += denorm_magic;
    std::memcpy(&f, &ff, 4);
    o = static_cast<uint16_t>(f - denorm_magic_u);
  } else {
    uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = static_cast<uint16_t>(f >> 13);
  }
  return half_t{static_cast<uint16_t>(o | (sign >> 16))};
}

ParallelFor serial_for() {
  return [](size_t total, const std::function<void(size_t)>& body) {
    for (size_t i = 0; i < total; ++i) body(i);
  };
}

namespace {

constexpr float kEps = 1e-12f;
constexpr int64_t kRowsPerTask = 16;

// Quantizes one float row with the per-token rule; writes the stored scale.
template <typename T>
void quantize_row(const RowLoops& loops, const float* v, int64_t k, int8_t* q, T* scale) {
  const float amax = loops.max_abs(v, k);
  T s = from_float<T>(std::max(amax, kEps) / 127.0f);
  *scale = s;
  float sf = to_float(s);
  if (!(sf > 0.0f)) {
    std::memset(q, 0, static_cast<size_t>(k));
    return;
  }
  loops.quantize(v, k, sf, q);
}

template <typename Body>
void for_row_blocks(int64_t rows, const ParallelFor& pf, Body body) {
  if (rows <= 0) return;
  size_t tasks = static_cast<size_t>((rows + kRowsPerTask - 1) / kRowsPerTask);
  pf(tasks, [&](size_t t) {
    int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask;
    int64_t r1 = std::min(rows, r0 + kRowsPerTask);
    body(r0, r1);
  });
}

}  // namespace

template <typename T>
void quantize_per_token(const T* x, const T* smooth_inv, int64_t rows, int64_t k, int8_t* q, T* scale,
                        const ParallelFor& pf) {
  for_row_blocks(rows, pf, [&](int64_t r0, int64_t r1) {
    const RowLoops& loops = row_loops();  // this task's instruction set, asked once
    std::vector<float> v(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * k;
      for (int64_t j = 0; j < k; ++j) {
        v[j] = smooth_inv ? to_float(xr[j]) * to_float(smooth_inv[j]) : to_float(xr[j]);
      }
      quantize_row(loops, v.data(), k, q + r * k, scale + r);
    }
  });
}

// RMSNorm's input row in float: x, or (x + skip) + bias rounded to T, the residual sum, also stored to
// sum_out when given. One plain loop per case (no test inside the element loop), so each vectorises.
template <typename T>
void norm_input(const T* x, const T* skip, const T* bias, int64_t k, float* v, T* sum_out) {
  if (skip == nullptr) {
    for (int64_t j = 0; j < k; ++j) v[j] = to_float(x[j]);
    return;
  }
  if (bias != nullptr) {
    for (int64_t j = 0; j < k; ++j) v[j] = (to_float(x[j]) + to_float(skip[j])) + to_float(bias[j]);
  } else {
    for (int64_t j = 0; j < k; ++j) v[j] = to_float(x[j]) + to_float(skip[j]);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (sum_out != nullptr) std::memcpy(sum_out, v, static_cast<size_t>(k) * sizeof(float));
  } else if (sum_out != nullptr) {
    for (int64_t j = 0; j < k; ++j) v[j] = to_float(sum_out[j] = from_float<T>(v[j]));
  } else {
    for (int64_t j = 0; j < k; ++j) v[j] = to_float(from_float<T>(v[j]));
  }
}

template <typename T>
void rmsnorm_quant(const T* x, const T* skip, const T* bias, const T* gamma, float eps, int64_t rows,
                   int64_t k, int8_t* q, T* scale, T* sum_out, const ParallelFor& pf) {
  for_row_blocks(rows, pf, [&](int64_t r0, int64_t r1) {
    const RowLoops& loops = row_loops();  // this task's instruction set, asked once
    std::vector<float> v(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      norm_input(x + r * k, skip ? skip + r * k : nullptr, bias, k, v.data(), sum_out ? sum_out + r * k : nullptr);
      const double ss = loops.sum_squares(v.data(), k, 0.0f);
      float ms = k > 0 ? static_cast<float>(ss / static_cast<double>(k)) : 0.0f;
      float inv = 1.0f / std::sqrt(ms + eps);
      for (int64_t j = 0; j < k; ++j) v[j] = v[j] * inv * to_float(gamma[j]);
      quantize_row(loops, v.data(), k, q + r * k, scale + r);
    }
  });
}

template <typename T>
void layernorm_quant(const T* x, const T* gamma, const T* beta, float eps, int64_t rows, int64_t k,
                     int8_t* q, T* scale, const ParallelFor& pf) {
  for_row_blocks(rows, pf, [&](int64_t r0, int64_t r1) {
    const RowLoops& loops = row_loops();  // this task's instruction set, asked once
    std::vector<float> v(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * k;
      for (int64_t j = 0; j < k; ++j) v[j] = to_float(xr[j]);
      const double s = loops.sum(v.data(), k);
      float mean = k > 0 ? static_cast<float>(s / static_cast<double>(k)) : 0.0f;
      const double ss = loops.sum_squares(v.data(), k, mean);
      float var = k > 0 ? static_cast<float>(ss / static_cast<double>(k)) : 0.0f;
      float inv = 1.0f / std::sqrt(var + eps);
      for (int64_t j = 0; j < k; ++j) {
        float y = (v[j] - mean) * inv * to_float(gamma[j]);
        v[j] = beta ? y + to_float(beta[j]) : y;
      }
      quantize_row(loops, v.data(), k, q + r * k, scale + r);
    }
  });
}

// ---- int8 GEMM ---------------------------------------------------------------------------------------
namespace {

constexpr int64_t kTileM = 64, kTileN = 64;
static_assert(kTileN <= vnni::kMaxTileCols, "the VNNI tile keeps one compensation per column on the stack");

// acc[i][j] for MR rows of X and NR rows of W (both K-contiguous), portable version.
template <int MR, int NR>
void micro_scalar(const int8_t* x, const int8_t* w, int64_t k, int64_t ldx, int64_t ldw, int32_t* out,
                  int64_t ldo) {
  int32_t acc[MR][NR] = {};
  for (int64_t p = 0; p < k; ++p) {
    for (int i = 0; i < MR; ++i) {
      int32_t a = x[i * ldx + p];
      for (int j = 0; j < NR; ++j) acc[i][j] += a * static_cast<int32_t>(w[j * ldw + p]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * ldo + j] = acc[i][j];
}

#ifdef SQ_X86
// Sign-extends 16 int8 to int16 and multiplies pairwise into int32 (vpmaddwd): exact, no saturation.
template <int MR, int NR>
__attribute__((target("avx2"))) void micro_avx2(const int8_t* x, const int8_t* w, int64_t k, int64_t ldx,
                                                int64_t ldw, int32_t* out, int64_t ldo) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ldw + p)));
    for (int i = 0; i < MR; ++i) {
      __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i * ldx + p)));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      int32_t s = hsum256(acc[i][j]);
      for (int64_t t = p; t < k; ++t) s += static_cast<int32_t>(x[i * ldx + t]) * w[j * ldw + t];
      out[i * ldo + j] = s;
    }
  }
}

// out[j] += x16 . w[j] over k16 (a multiple of 16) for NR rows of W; x16 is the activation row already
// sign-extended to int16, so only W is widened in the loop.
template <int NR>
__attribute__((target("avx2"))) void gemv_avx2(const int16_t* x16, const int8_t* w, int64_t ldw, int64_t k16,
                                               int32_t* out) {
  __m256i acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = _mm256_setzero_si256();
  for (int64_t p = 0; p < k16; p += 16) {
    // The next NR rows of W, a line every 64 / NR steps: from memory the loads alone fell behind (one core,
    // 1536 x 576 from memory: 74 -> 31-32 us).
    if (NR * p % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + NR * ldw + p * NR), _MM_HINT_T0);
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + p));
    for (int j = 0; j < NR; ++j) {
      __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ldw + p)));
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(xv, wv));
    }
  }
  for (int j = 0; j < NR; ++j) out[j] += hsum256(acc[j]);
}

__attribute__((target("avx2"))) void widen_row(const int8_t* src, int64_t k16, int16_t* dst) {
  for (int64_t p = 0; p < k16; p += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + p),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + p))));
}

constexpr int64_t kGemvCols = 64;

// One row of X (decode): prepared once for the path (widened to int16 for AVX2, x ^ 0x80 for VNNI), then
// tasks of kGemvCols columns, 4 at a time, straight into a small accumulator row; no tile buffer.
template <typename Epilogue>
void gemv(CpuIsa isa, const int8_t* xq, const int8_t* wq, int64_t n, int64_t k, const ParallelFor& pf,
          Epilogue& epilogue) {
  const int64_t k16 = k - k % 16;
  std::vector<int16_t> row(static_cast<size_t>(k16));  // int16 for AVX2; VNNI: its first bytes as u8
  auto* xu = reinterpret_cast<uint8_t*>(row.data());
  if (is_vnni(isa)) vnni::flip_row(isa, xq, k, xu);
  else widen_row(xq, k16, row.data());
  pf(static_cast<size_t>((n + kGemvCols - 1) / kGemvCols), [&](size_t t) {
    const int64_t n0 = static_cast<int64_t>(t) * kGemvCols, n1 = std::min(n, n0 + kGemvCols);
    int32_t acc[kGemvCols] = {};
    if (is_vnni(isa)) {
      vnni::gemv_block(isa, xu, xq, wq, k, n0, n1, acc);
    } else {
      int64_t j = n0;
      for (; j + 4 <= n1; j += 4) gemv_avx2<4>(row.data(), wq + j * k, k, k16, acc + (j - n0));
      for (; j < n1; ++j) gemv_avx2<1>(row.data(), wq + j * k, k, k16, acc + (j - n0));
      for (j = n0; j < n1; ++j)
        for (int64_t p = k16; p < k; ++p) acc[j - n0] += static_cast<int32_t>(xq[p]) * wq[j * k + p];
    }
    epilogue(0, 1, n0, n1, acc, kGemvCols);
  });
}
#endif

template <int MR, int NR>
void micro(bool avx2, const int8_t* x, const int8_t* w, int64_t k, int64_t ldx, int64_t ldw, int32_t* out,
           int64_t ldo) {
#ifdef SQ_X86
  if (avx2) return micro_avx2<MR, NR>(x, w, k, ldx, ldw, out, ldo);
#endif
  micro_scalar<MR, NR>(x, w, k, ldx, ldw, out, ldo);
}

template <int NR>
void micro_rows(bool avx2, int64_t mr, const int8_t* x, const int8_t* w, int64_t k, int32_t* out, int64_t ldo) {
  switch (mr) {
    case 4: return micro<4, NR>(avx2, x, w, k, k, k, out, ldo);
    case 3: return micro<3, NR>(avx2, x, w, k, k, k, out, ldo);
    case 2: return micro<2, NR>(avx2, x, w, k, k, k, out, ldo);
    default: return micro<1, NR>(avx2, x, w, k, k, k, out, ldo);
  }
}

std::atomic<int> g_last_weights{kWeightsAsGiven};

#ifdef SQ_X86
// The VNNI GEMM for kBlockPackMinRows..kPackedMinRows rows: a task per block of kTileN columns (and, when there
// are few blocks for the threads, per kTileM rows too) packs its block into a per-thread buffer, then
// runs its rows against it. The buffer (kTileN x K bytes: 704 KB at K = 11008) lives as long as its thread.
template <typename Epilogue>
void block_packed_gemm(CpuIsa isa, const int8_t* xq, const int8_t* wq, int64_t m, int64_t n, int64_t k,
                       const ParallelFor& pf, Epilogue& epilogue) {
  static_assert(kTileN == vnni::kMaxTileCols, "a block is one tile of columns");
  const int64_t kp = (k + 3) / 4 * 4;
  const std::vector<uint8_t> xu = vnni::flip_rows(isa, xq, m, k, kp);
  const int64_t tn = (n + kTileN - 1) / kTileN;
  // Fewer than about four blocks per hardware thread: split the rows too (each piece repacks its block), so
  // every thread has work. ORT's pool size is not visible to a custom op; it defaults to the cores.
  static const int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t chunk = tn < 4 * threads ? kTileM : m, tm = (m + chunk - 1) / chunk;
  pf(static_cast<size_t>(tm * tn), [&](size_t t) {
    const int64_t bn = static_cast<int64_t>(t) % tn, bm = static_cast<int64_t>(t) / tn;
    const int64_t n0 = bn * kTileN, n1 = std::min(n, n0 + kTileN);
    thread_local std::vector<int8_t> block;
    thread_local std::vector<int32_t> comp;
    block.resize(static_cast<size_t>(vnni::block_bytes(kp)));
    comp.resize(static_cast<size_t>(kTileN));
    vnni::pack_block(isa, wq, n, k, kp, n0, block.data(), comp.data());
    std::vector<int32_t> acc(static_cast<size_t>(kTileM * kTileN));
    for (int64_t m0 = bm * chunk; m0 < std::min(m, (bm + 1) * chunk); m0 += kTileM) {
      const int64_t m1 = std::min(m, m0 + kTileM);
      vnni::gemm_block_packed(isa, xu.data(), kp, block.data(), comp.data(), m0, m1, n1 - n0, acc.data(), kTileN);
      epilogue(m0, m1, n0, n1, acc.data(), kTileN);
    }
  });
}
#endif

// One output tile [m0, m1) x [n0, n1): int32 accumulators into acc (row stride ldo).
void gemm_tile(CpuIsa isa, const int8_t* xq, const int8_t* wq, int64_t k, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1, int32_t* acc, int64_t ldo) {
#ifdef SQ_X86
  if (is_vnni(isa)) return vnni::gemm_tile(isa, xq, wq, k, m0, m1, n0, n1, acc, ldo);
#endif
  const bool avx2 = isa == CpuIsa::kAvx2;
  for (int64_t m = m0; m < m1; m += 4) {
    int64_t mr = std::min<int64_t>(4, m1 - m);
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2)
      micro_rows<2>(avx2, mr, xq + m * k, wq + n * k, k, acc + (m - m0) * ldo + (n - n0), ldo);
    if (n < n1) micro_rows<1>(avx2, mr, xq + m * k, wq + n * k, k, acc + (m - m0) * ldo + (n - n0), ldo);
  }
}

template <typename Epilogue>
void tiled_gemm(const int8_t* xq, const int8_t* wq, int64_t m, int64_t n, int64_t k, const ParallelFor& pf,
                Epilogue epilogue, const PrepackedWeights* prepacked = nullptr) {
  if (m <= 0 || n <= 0) return;
  const CpuIsa isa = cpu_isa();
  // Panels made ahead of the call pay for 2..255 rows; one row is gemv's (measured faster from L3), and from 256
  // rows panels packed within the call, hot in cache, were faster than the session's (tools/RESULTS.md).
  const bool use_prepacked =
      prepacked && m > 1 && m < vnni::kPackedMinRows && prepacked->serves(isa, wq, n, k);
  int weights = kWeightsAsGiven;
  if (use_prepacked) weights = kWeightsPrepacked;
  else if (is_vnni(isa) && m >= vnni::kPackedMinRows) weights = kWeightsRepacked;
  else if (is_vnni(isa) && m >= vnni::kBlockPackMinRows) weights = kWeightsPackedByBlock;
  g_last_weights.store(weights, std::memory_order_relaxed);
#ifdef SQ_X86
  if (m == 1 && isa != CpuIsa::kScalar) return gemv(isa, xq, wq, n, k, pf, epilogue);
#endif
  // Tiles of kTileM x kTileN on the threads; tile(m0, m1, n0, n1, acc) fills the int32 accumulators.
  auto run_tiles = [&](auto tile) {
    const int64_t tm = (m + kTileM - 1) / kTileM, tn = (n + kTileN - 1) / kTileN;
    pf(static_cast<size_t>(tm * tn), [&](size_t t) {
      const int64_t bm = static_cast<int64_t>(t) / tn, bn = static_cast<int64_t>(t) % tn;
      const int64_t m0 = bm * kTileM, m1 = std::min(m, m0 + kTileM);
      const int64_t n0 = bn * kTileN, n1 = std::min(n, n0 + kTileN);
      std::vector<int32_t> acc(static_cast<size_t>(kTileM * kTileN));
      tile(m0, m1, n0, n1, acc.data());
      epilogue(m0, m1, n0, n1, acc.data(), kTileN);
    });
  };
#ifdef SQ_X86
  // Panels of W: made ahead of the call, or here for many rows.
  if (use_prepacked || (is_vnni(isa) && m >= vnni::kPackedMinRows)) {
    const vnni::PackedW here = use_prepacked ? vnni::PackedW{} : vnni::pack_weights(isa, wq, n, k, pf);
    const vnni::PackedW& packed = use_prepacked ? prepacked->w : here;
    const std::vector<uint8_t> xu = vnni::flip_rows(isa, xq, m, k, packed.kp);
    return run_tiles([&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc) {
      vnni::gemm_tile_packed(isa, xu.data(), packed, m0, m1, n0, n1, acc, kTileN);
    });
  }
  if (is_vnni(isa) && m >= vnni::kBlockPackMinRows) return block_packed_gemm(isa, xq, wq, m, n, k, pf, epilogue);
#endif
  run_tiles([&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* acc) {
    gemm_tile(isa, xq, wq, k, m0, m1, n0, n1, acc, kTileN);
  });
}

}  // namespace

void int8_gemm_s32(const int8_t* xq, const int8_t* wq, int64_t m, int64_t n, int64_t k, int32_t* out,
                   const ParallelFor& pf) {
  tiled_gemm(xq, wq, m, n, k, pf, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int32_t* acc, int64_t ld) {
    for (int64_t i = m0; i < m1; ++i)
      for (int64_t j = n0; j < n1; ++j) out[i * n + j] = acc[(i - m0) * ld + (j - n0)];
  });
}

namespace {

// y[j] = T(float(acc[j]) * (xs * w_scale[j]) + bias[j]) for j in [0, n), each step rounded on its own (never an
// fma), as the reference does.
template <typename T>
void dequant_row_scalar(const int32_t* acc, float xs, const T* w_scale, const T* bias, int64_t n, T* y) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) * (xs * to_float(w_scale[j]));
    if (bias) v += to_float(bias[j]);
    y[j] = from_float<T>(v);
  }
}

#ifdef SQ_X86
// The same eight at a time: vcvtdq2ps and vcvtph2ps are exact or round to nearest even like the scalar casts,
// vcvtps2ph rounds to nearest even as from_float<half_t> does, and without "fma" in the target nothing fuses.
// At K = 576 the scalar epilogue took as long as the GEMM itself.
__attribute__((target("avx2,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,f16c"))) inline __m256 load8(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,f16c"))) inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
__attribute__((target("avx2,f16c"))) inline void store8(half_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
__attribute__((target("avx2,f16c"))) void dequant_row_avx2(const int32_t* acc, float xs, const T* w_scale,
                                                           const T* bias, int64_t n, T* y) {
  const __m256 vxs = _mm256_set1_ps(xs);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)));
    __m256 v = _mm256_mul_ps(a, _mm256_mul_ps(vxs, load8(w_scale + j)));
    if (bias) v = _mm256_add_ps(v, load8(bias + j));
    store8(y + j, v);
  }
  dequant_row_scalar(acc + j, xs, w_scale + j, bias ? bias + j : nullptr, n - j, y + j);
}
#endif

template <typename T>
void dequant_row(bool avx2, const int32_t* acc, float xs, const T* w_scale, const T* bias, int64_t n, T* y) {
#ifdef SQ_X86
  if (avx2) return dequant_row_avx2(acc, xs, w_scale, bias, n, y);
#endif
  dequant_row_scalar(acc, xs, w_scale, bias, n, y);
}

}  // namespace

template <typename T>
void int8_matmul_dequant(const int8_t* xq, const T* x_scale, const int8_t* wq, const T* w_scale,
                         const T* bias, int64_t m, int64_t n, int64_t k, T* y, const ParallelFor& pf,
                         const PrepackedWeights* packed) {
  const bool avx2 = cpu_isa() != CpuIsa::kScalar;
  auto epilogue = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int32_t* acc, int64_t ld) {
    for (int64_t i = m0; i < m1; ++i)
      dequant_row(avx2, acc + (i - m0) * ld, to_float(x_scale[i]), w_scale + n0, bias ? bias + n0 : nullptr, n1 - n0,
                  y + i * n + n0);
  };
  tiled_gemm(xq, wq, m, n, k, pf, epilogue, packed);
}

int last_gemm_weights() { return g_last_weights.load(std::memory_order_relaxed); }

#define SQ_INSTANTIATE(T)                                                                                   \
  template void quantize_per_token<T>(const T*, const T*, int64_t, int64_t, int8_t*, T*, const ParallelFor&); \
  template void rmsnorm_quant<T>(const T*, const T*, const T*, const T*, float, int64_t, int64_t, int8_t*, T*, \
                                 T*, const ParallelFor&);                                                    \
  template void layernorm_quant<T>(const T*, const T*, const T*, float, int64_t, int64_t, int8_t*, T*,         \
                                   const ParallelFor&);                                                      \
  template void int8_matmul_dequant<T>(const int8_t*, const T*, const int8_t*, const T*, const T*, int64_t,   \
                                       int64_t, int64_t, T*, const ParallelFor&, const PrepackedWeights*);
SQ_INSTANTIATE(float)
SQ_INSTANTIATE(half_t)

}  // namespace sq

#ifdef SQ_ONNX_TEST_HOOKS
// How the last int8 GEMM took W (for tests): 0 as given, 1 repacked whole in the call, 2 packed at session
// creation, 3 packed a block of columns at a time in the call.
extern "C" __attribute__((visibility("default"))) int sq_onnx_cpu_last_gemm_weights() {
  return sq::last_gemm_weights();
}
#endif
