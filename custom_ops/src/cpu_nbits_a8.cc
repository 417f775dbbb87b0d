// The W4A8 / W8A8 kernel of cpu_nbits_a8.h: packing, A's block quantization and the product, on AVX-512 VNNI,
// AVX-VNNI and AVX2 (cpu_nbits_a8.inc, picked by cpu_isa()) and in portable C++ over the same packed layout (for
// every other CPU, and as the tests' second opinion).
#include "cpu_nbits_a8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_isa.h"
#include "cpu_simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SQ_X86 1
#endif

namespace sq {
namespace {

constexpr int64_t kP = kNBitsPanelCols;

inline uint8_t nibble(const uint8_t* bytes, int64_t i) { return (bytes[i / 2] >> ((i % 2) * 4)) & 0x0f; }

// A quantized per block: xq [m][kp] (zeros past K), sa [m][blocks] (the scales), xs [m][blocks] (sa x the block's
// sum of codes, for the zero points).
struct QuantizedA {
  int64_t kp = 0;
  std::vector<int8_t> xq;
  std::vector<float> sa, xs;
};

void quantize_row_scalar(const float* a, int64_t k, int64_t block, int64_t blocks, int8_t* q, float* sa, float* xs) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * block, k1 = std::min(k, k0 + block);
    float amax = 0.0f;
    for (int64_t t = k0; t < k1; ++t) amax = std::max(amax, std::fabs(a[t]));
    const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int64_t t = k0; t < k1; ++t) {
      const int32_t c = static_cast<int32_t>(std::nearbyint(a[t] * inv));
      q[t] = static_cast<int8_t>(c);
      sum += c;
    }
    for (int64_t t = k1; t < k0 + block; ++t) q[t] = 0;
    sa[b] = amax / 127.0f;
    xs[b] = sa[b] * static_cast<float>(sum);
  }
}

#ifdef SQ_X86
// ---- SIMD paths: cpu_nbits_a8.inc over each instruction set's vectors ----------------------------------------
namespace avx512vnni {  // 16 columns per vector, 32 registers: 4 rows x 2 vectors (16 + 16 accumulators... in use)
#define SQ_NB_TARGET "avx2,fma,avx512f,avx512bw,avx512vnni"
#define SQ_V __attribute__((target(SQ_NB_TARGET))) static
struct Vec {
  using V = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16, kMr = 4, kNq = 2, kNqDecode = 4;
  SQ_V V load(const void* p) { return _mm512_loadu_si512(p); }
  SQ_V V zero() { return _mm512_setzero_si512(); }
  SQ_V V bytes(char c) { return _mm512_set1_epi8(c); }
  SQ_V V and_(V a, V b) { return _mm512_and_si512(a, b); }
  SQ_V V high_nibbles(V a) { return _mm512_srli_epi16(a, 4); }
  SQ_V V bcast4(int32_t v) { return _mm512_set1_epi32(v); }
  SQ_V V dot4(V acc, V u, V s) { return _mm512_dpbusd_epi32(acc, u, s); }
  SQ_V V dot8(V acc, V u, V s) { return _mm512_dpbusd_epi32(acc, u, s); }
  SQ_V V add32(V a, V b) { return _mm512_add_epi32(a, b); }
  SQ_V V round(F f) { return _mm512_cvtps_epi32(f); }
  SQ_V void store_bytes(int8_t* q, V c) { _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(c)); }
  SQ_V int32_t hsum(V v) { return _mm512_reduce_add_epi32(v); }
  SQ_V F fzero() { return _mm512_setzero_ps(); }
  SQ_V F fload(const float* p) { return _mm512_loadu_ps(p); }
  SQ_V void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  SQ_V F fset1(float v) { return _mm512_set1_ps(v); }
  SQ_V F cvt(V v) { return _mm512_cvtepi32_ps(v); }
  SQ_V F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
  SQ_V F fadd(F a, F b) { return _mm512_add_ps(a, b); }
  SQ_V F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  SQ_V F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  SQ_V F fmax(F a, F b) { return _mm512_max_ps(a, b); }
  SQ_V F fabs(F a) { return _mm512_abs_ps(a); }
  SQ_V float hmax(F a) { return _mm512_reduce_max_ps(a); }
};
#undef SQ_V
#include "cpu_nbits_a8.inc"
#undef SQ_NB_TARGET
}  // namespace avx512vnni

// The 256-bit operations that AVX2 and AVX-VNNI share (16 registers: 2 rows x 2 vectors).
#define SQ_VEC256_COMMON                                                                                         \
  using V = __m256i;                                                                                             \
  using F = __m256;                                                                                              \
  static constexpr int kLanes = 8, kMr = 2, kNq = 2, kNqDecode = 2;                                              \
  SQ_V V load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }                      \
  SQ_V V zero() { return _mm256_setzero_si256(); }                                                               \
  SQ_V V bytes(char c) { return _mm256_set1_epi8(c); }                                                           \
  SQ_V V and_(V a, V b) { return _mm256_and_si256(a, b); }                                                       \
  SQ_V V high_nibbles(V a) { return _mm256_srli_epi16(a, 4); }                                                   \
  SQ_V V bcast4(int32_t v) { return _mm256_set1_epi32(v); }                                                      \
  SQ_V V add32(V a, V b) { return _mm256_add_epi32(a, b); }                                                      \
  SQ_V V round(F f) { return _mm256_cvtps_epi32(f); }                                                            \
  SQ_V void store_bytes(int8_t* q, V c) {                                                                        \
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));              \
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w16, w16));                                  \
  }                                                                                                              \
  SQ_V int32_t hsum(V v) { return hsum256(v); }                                                                  \
  SQ_V F fzero() { return _mm256_setzero_ps(); }                                                                 \
  SQ_V F fload(const float* p) { return _mm256_loadu_ps(p); }                                                    \
  SQ_V void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }                                                    \
  SQ_V F fset1(float v) { return _mm256_set1_ps(v); }                                                            \
  SQ_V F cvt(V v) { return _mm256_cvtepi32_ps(v); }                                                              \
  SQ_V F fmul(F a, F b) { return _mm256_mul_ps(a, b); }                                                          \
  SQ_V F fadd(F a, F b) { return _mm256_add_ps(a, b); }                                                          \
  SQ_V F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }                                               \
  SQ_V F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }                                             \
  SQ_V F fmax(F a, F b) { return _mm256_max_ps(a, b); }                                                          \
  SQ_V F fabs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }              \
  SQ_V float hmax(F a) {                                                                                         \
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));                               \
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));                                                                      \
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));                                                \
  }

#ifdef SQ_HAVE_AVXVNNI
namespace avxvnni {
#define SQ_NB_TARGET "avx2,fma,avxvnni"
#define SQ_V __attribute__((target(SQ_NB_TARGET))) static
struct Vec {
  SQ_VEC256_COMMON
  SQ_V V dot4(V acc, V u, V s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
  SQ_V V dot8(V acc, V u, V s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
};
#undef SQ_V
#include "cpu_nbits_a8.inc"
#undef SQ_NB_TARGET
}  // namespace avxvnni
#endif

namespace avx2 {
#define SQ_NB_TARGET "avx2,fma"
#define SQ_V __attribute__((target(SQ_NB_TARGET))) static
struct Vec {
  SQ_VEC256_COMMON
  // vpmaddubsw's int16 pair sums are exact for 4-bit codes (2 x 15 x 127 < 2^15); 8-bit codes go as two nibbles.
  SQ_V V dot4(V acc, V u, V s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  SQ_V V dot8(V acc, V u, V s) {
    const V low = _mm256_set1_epi8(0x0f);
    const V hi = dot4(zero(), _mm256_and_si256(_mm256_srli_epi16(u, 4), low), s);
    return _mm256_add_epi32(dot4(acc, _mm256_and_si256(u, low), s), _mm256_slli_epi32(hi, 4));
  }
};
#undef SQ_V
#include "cpu_nbits_a8.inc"
#undef SQ_NB_TARGET
}  // namespace avx2
#undef SQ_VEC256_COMMON
#endif  // SQ_X86

// The portable path: the same layout, int32 per block, float over blocks (the same order of float operations).
void tile_scalar(const QuantizedA& qa, int64_t m0, int64_t m1, const NBitsPacked& w, int64_t q0, int64_t q1,
                 const float* bias, float* y) {
  const int64_t bl = w.block, groups = bl / 8, pstride = w.panel_code_bytes();
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t p = q0; p < q1; ++p) {
      float acc[kP] = {};
      for (int64_t b = 0; b < w.blocks; ++b) {
        const uint8_t* cb = w.codes.data() + p * pstride + b * w.block_code_bytes();
        const int8_t* xb = qa.xq.data() + m * qa.kp + b * bl;
        const int64_t at = (p * w.blocks + b) * kP, r = m * w.blocks + b;
        for (int64_t c = 0; c < kP; ++c) {
          int32_t dot = 0;
          if (w.bits == 8) {
            for (int64_t t = 0; t < bl; ++t) dot += cb[(t / 4) * 64 + c * 4 + t % 4] * xb[t];
          } else {
            for (int64_t v = 0; v < groups; ++v)
              for (int64_t i = 0; i < 4; ++i) {
                const uint8_t byte = cb[v * 64 + c * 4 + i];
                dot += (byte & 0x0f) * xb[4 * v + i] + (byte >> 4) * xb[4 * (v + groups) + i];
              }
          }
          const float f = static_cast<float>(dot) * qa.sa[r];
          acc[c] = std::fma(-w.zscale[at + c], qa.xs[r], std::fma(f, w.scale[at + c], acc[c]));
        }
      }
      for (int64_t c = 0; c < kP && p * kP + c < w.n; ++c) y[m * w.n + p * kP + c] = acc[c] + (bias ? bias[p * kP + c] : 0.0f);
    }
  }
}

// One instruction set's kernels: the GEMM's choice (cpu_isa()), less what this build or CPU lacks.
struct Path {
  void (*quantize_row)(const float*, int64_t, int64_t, int64_t, int8_t*, float*, float*);
  void (*tile)(const QuantizedA&, int64_t, int64_t, const NBitsPacked&, int64_t, int64_t, const float*, float*);
  int64_t lanes;  // output columns per unit of tile's column range
};

Path path_for(CpuIsa isa) {
  switch (isa) {
#ifdef SQ_X86
    case CpuIsa::kAvx512Vnni: return {avx512vnni::quantize_row, avx512vnni::tile_any, 16};
#ifdef SQ_HAVE_AVXVNNI
    case CpuIsa::kAvxVnni: return {avxvnni::quantize_row, avxvnni::tile_any, 8};
#else
    case CpuIsa::kAvxVnni:
#endif
    case CpuIsa::kAvx2: return {avx2::quantize_row, avx2::tile_any, 8};
#endif
    default: return {quantize_row_scalar, tile_scalar, kP};
  }
}

}  // namespace

std::shared_ptr<const NBitsPacked> pack_nbits(const uint8_t* b, const float* scales, const uint8_t* zero_points,
                                              int64_t n, int64_t k, int64_t block, int64_t bits) {
  auto w = std::make_shared<NBitsPacked>();
  w->n = n;
  w->k = k;
  w->block = block;
  w->bits = bits;
  w->blocks = (k + block - 1) / block;
  w->panels = (n + kP - 1) / kP;
  const int64_t groups = block / 8, blob = block * bits / 8, zp_row = (w->blocks * bits + 7) / 8;
  w->codes.assign(static_cast<size_t>(w->panels * w->panel_code_bytes()), 0);
  w->scale.assign(static_cast<size_t>(w->panels * w->blocks * kP), 0.0f);
  w->zscale.assign(w->scale.size(), 0.0f);
  for (int64_t col = 0; col < n; ++col) {
    const int64_t p = col / kP, c = col % kP;
    for (int64_t bk = 0; bk < w->blocks; ++bk) {
      const uint8_t* src = b + (col * w->blocks + bk) * blob;
      uint8_t* dst = w->codes.data() + p * w->panel_code_bytes() + bk * w->block_code_bytes() + c * 4;
      for (int64_t t = 0; t < block && bk * block + t < k; ++t) {
        const int64_t g = t / 4, i = t % 4;
        if (bits == 8) {
          dst[g * 64 + i] = src[t];
          continue;
        }
        const uint8_t code = nibble(src, t);
        if (g < groups)
          dst[g * 64 + i] |= code;
        else
          dst[(g - groups) * 64 + i] |= static_cast<uint8_t>(code << 4);
      }
      const float s = scales[col * w->blocks + bk];
      const uint8_t* zrow = zero_points ? zero_points + col * zp_row : nullptr;
      const float zp = !zrow ? static_cast<float>(1 << (bits - 1)) : static_cast<float>(bits == 8 ? zrow[bk] : nibble(zrow, bk));
      const int64_t at = (p * w->blocks + bk) * kP + c;
      w->scale[at] = s;
      w->zscale[at] = zp * s;
    }
  }
  return w;
}

void nbits_a8_matmul(const float* a, int64_t m, const NBitsPacked& w, const float* bias, float* y, const ParallelFor& pf) {
  if (m == 0 || w.n == 0) return;
  QuantizedA qa;
  qa.kp = w.blocks * w.block;
  qa.xq.resize(static_cast<size_t>(m * qa.kp));
  qa.sa.resize(static_cast<size_t>(m * w.blocks));
  qa.xs.resize(qa.sa.size());
  const Path path = path_for(cpu_isa());
  constexpr int64_t kRowsPerTask = 64;
  const int64_t row_tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  pf(static_cast<size_t>(row_tasks), [&](size_t t) {
    for (int64_t r = static_cast<int64_t>(t) * kRowsPerTask; r < std::min(m, (static_cast<int64_t>(t) + 1) * kRowsPerTask); ++r)
      path.quantize_row(a + r * w.k, w.k, w.block, w.blocks, qa.xq.data() + r * qa.kp, qa.sa.data() + r * w.blocks,
                        qa.xs.data() + r * w.blocks);
  });
  // Tasks: rows by chunks of 64 columns, whose weights stay in L1/L2 across the rows. The SIMD paths count
  // columns in vectors (16 or 8 lanes), the portable one in panels of 16.
  constexpr int64_t kColsPerTask = 64;
  const int64_t units = w.panels * kP / path.lanes, per_task = kColsPerTask / path.lanes;
  const int64_t col_tasks = (units + per_task - 1) / per_task;
  pf(static_cast<size_t>(row_tasks * col_tasks), [&](size_t t) {
    const int64_t rt = static_cast<int64_t>(t) / col_tasks, ct = static_cast<int64_t>(t) % col_tasks;
    const int64_t m0 = rt * kRowsPerTask, m1 = std::min(m, m0 + kRowsPerTask);
    const int64_t q0 = ct * per_task, q1 = std::min(units, q0 + per_task);
    path.tile(qa, m0, m1, w, q0, q1, bias, y);
  });
}

}  // namespace sq
