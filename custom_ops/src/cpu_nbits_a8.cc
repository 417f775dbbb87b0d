// The W4A8 / W8A8 kernel of cpu_nbits_a8.h: packing, A's block quantization, and the product on AVX-512 VNNI, with a
// portable path over the same packed layout for every other CPU (and as the tests' second opinion).
#include "cpu_nbits_a8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_isa.h"

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
  int64_t kp = 0, blocks = 0;
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
#define SQ_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vnni")))

// The scalar row's arithmetic on 16 lanes: the same products (a * inv, rounded to nearest-even by cvtps).
SQ_AVX512 void quantize_row_avx512(const float* a, int64_t k, int64_t block, int64_t blocks, int8_t* q, float* sa,
                                   float* xs) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * block, k1 = std::min(k, k0 + block), len = k1 - k0;
    __m512 mx = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(a + k0 + t)));
    float amax = _mm512_reduce_max_ps(mx);
    for (int64_t u = t; u < len; ++u) amax = std::max(amax, std::fabs(a[k0 + u]));
    const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512();
    for (t = 0; t + 16 <= len; t += 16) {
      const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(a + k0 + t), vinv));
      sum = _mm512_add_epi32(sum, c);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + t), _mm512_cvtsepi32_epi8(c));
    }
    int32_t s = _mm512_reduce_add_epi32(sum);
    for (int64_t u = t; u < len; ++u) {
      const int32_t c = static_cast<int32_t>(std::nearbyint(a[k0 + u] * inv));
      q[k0 + u] = static_cast<int8_t>(c);
      s += c;
    }
    std::memset(q + k1, 0, static_cast<size_t>(k0 + block - k1));
    sa[b] = amax / 127.0f;
    xs[b] = sa[b] * static_cast<float>(s);
  }
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Rows [0, MR) of A against NP panels: float accumulators for the whole K, int32 ones per block.
template <int BITS, int MR, int NP>
SQ_AVX512 void micro_avx512(const QuantizedA& qa, int64_t m0, const NBitsPacked& w, int64_t p0, const float* bias,
                            float* y, int64_t ldy) {
  const int64_t bl = w.block, groups = bl / 8, blocks = w.blocks, pstride = w.panel_code_bytes();
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 facc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) facc[i][p] = _mm512_setzero_ps();
  const uint8_t* codes = w.codes.data() + p0 * pstride;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i iacc[MR][NP];
    for (int i = 0; i < MR; ++i)
      for (int p = 0; p < NP; ++p) iacc[i][p] = _mm512_setzero_si512();
    const uint8_t* cb = codes + b * w.block_code_bytes();
    const int8_t* xb = qa.xq.data() + m0 * qa.kp + b * bl;
    if constexpr (BITS == 8) {
      for (int64_t v = 0; v < bl / 4; ++v) {
        __m512i wv[NP];
        for (int p = 0; p < NP; ++p) {
          if (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(cb + (p + NP) * pstride + v * 64), _MM_HINT_T0);
          wv[p] = _mm512_loadu_si512(cb + p * pstride + v * 64);
        }
        for (int i = 0; i < MR; ++i) {
          const __m512i x = _mm512_set1_epi32(load4(xb + i * qa.kp + 4 * v));
          for (int p = 0; p < NP; ++p) iacc[i][p] = _mm512_dpbusd_epi32(iacc[i][p], wv[p], x);
        }
      }
    } else {
    for (int64_t v = 0; v < groups; ++v) {
      __m512i lo[NP], hi[NP];
      for (int p = 0; p < NP; ++p) {
        // Decode reads W once, from memory: ask for the next call's panels at the same offset meanwhile.
        if (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(cb + (p + NP) * pstride + v * 64), _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(cb + p * pstride + v * 64);
        lo[p] = _mm512_and_si512(wv, low);
        hi[p] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i xl = _mm512_set1_epi32(load4(xb + i * qa.kp + 4 * v));
        const __m512i xh = _mm512_set1_epi32(load4(xb + i * qa.kp + 4 * (v + groups)));
        for (int p = 0; p < NP; ++p) {
          iacc[i][p] = _mm512_dpbusd_epi32(iacc[i][p], lo[p], xl);
          iacc[i][p] = _mm512_dpbusd_epi32(iacc[i][p], hi[p], xh);
        }
      }
    }
    }
    for (int p = 0; p < NP; ++p) {
      const int64_t at = ((p0 + p) * blocks + b) * kP;
      const __m512 s = _mm512_loadu_ps(w.scale.data() + at), z = _mm512_loadu_ps(w.zscale.data() + at);
      for (int i = 0; i < MR; ++i) {
        const int64_t r = (m0 + i) * blocks + b;
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(iacc[i][p]), _mm512_set1_ps(qa.sa[r]));
        facc[i][p] = _mm512_fnmadd_ps(z, _mm512_set1_ps(qa.xs[r]), _mm512_fmadd_ps(f, s, facc[i][p]));
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    const int64_t c0 = (p0 + p) * kP, cols = std::min<int64_t>(kP, w.n - c0);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * ldy + c0, mask, _mm512_add_ps(facc[i][p], bv));
  }
}

template <int BITS, int NP>
SQ_AVX512 void micro_rows_avx512(int64_t mr, const QuantizedA& qa, int64_t m0, const NBitsPacked& w, int64_t p0,
                                 const float* bias, float* y, int64_t ldy) {
  switch (mr) {
    case 4: return micro_avx512<BITS, 4, NP>(qa, m0, w, p0, bias, y, ldy);
    case 3: return micro_avx512<BITS, 3, NP>(qa, m0, w, p0, bias, y, ldy);
    case 2: return micro_avx512<BITS, 2, NP>(qa, m0, w, p0, bias, y, ldy);
    default: return micro_avx512<BITS, 1, NP>(qa, m0, w, p0, bias, y, ldy);
  }
}

// Rows [m0, m1) x panels [q0, q1): four rows by two panels at a time (one row by four panels for decode).
template <int BITS>
SQ_AVX512 void tile_avx512(const QuantizedA& qa, int64_t m0, int64_t m1, const NBitsPacked& w, int64_t q0, int64_t q1,
                           const float* bias, float* y) {
  if (m1 - m0 == 1) {
    int64_t p = q0;
    for (; p + 4 <= q1; p += 4) micro_avx512<BITS, 1, 4>(qa, m0, w, p, bias, y, w.n);
    for (; p < q1; ++p) micro_avx512<BITS, 1, 1>(qa, m0, w, p, bias, y, w.n);
    return;
  }
  for (int64_t m = m0; m < m1; m += 4) {
    const int64_t mr = std::min<int64_t>(4, m1 - m);
    int64_t p = q0;
    for (; p + 2 <= q1; p += 2) micro_rows_avx512<BITS, 2>(mr, qa, m, w, p, bias, y, w.n);
    for (; p < q1; ++p) micro_rows_avx512<BITS, 1>(mr, qa, m, w, p, bias, y, w.n);
  }
}
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
  qa.blocks = w.blocks;
  qa.kp = w.blocks * w.block;
  qa.xq.resize(static_cast<size_t>(m * qa.kp));
  qa.sa.resize(static_cast<size_t>(m * w.blocks));
  qa.xs.resize(qa.sa.size());
#ifdef SQ_X86
  const bool avx512 = cpu_isa() == CpuIsa::kAvx512Vnni;
#else
  const bool avx512 = false;
#endif
  constexpr int64_t kRowsPerTask = 64;
  const int64_t row_tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  auto quantize = [&](size_t t) {
    for (int64_t r = static_cast<int64_t>(t) * kRowsPerTask; r < std::min(m, (static_cast<int64_t>(t) + 1) * kRowsPerTask); ++r) {
      int8_t* q = qa.xq.data() + r * qa.kp;
      float* sa = qa.sa.data() + r * w.blocks;
      float* xs = qa.xs.data() + r * w.blocks;
#ifdef SQ_X86
      if (avx512) {
        quantize_row_avx512(a + r * w.k, w.k, w.block, w.blocks, q, sa, xs);
        continue;
      }
#endif
      quantize_row_scalar(a + r * w.k, w.k, w.block, w.blocks, q, sa, xs);
    }
  };
  pf(static_cast<size_t>(row_tasks), quantize);
  // Tasks: rows by panel chunks. A chunk of 4 panels (64 columns) keeps its weights in L1/L2 across the rows.
  constexpr int64_t kPanelsPerTask = 4;
  const int64_t col_tasks = (w.panels + kPanelsPerTask - 1) / kPanelsPerTask;
  pf(static_cast<size_t>(row_tasks * col_tasks), [&](size_t t) {
    const int64_t rt = static_cast<int64_t>(t) / col_tasks, ct = static_cast<int64_t>(t) % col_tasks;
    const int64_t m0 = rt * kRowsPerTask, m1 = std::min(m, m0 + kRowsPerTask);
    const int64_t q0 = ct * kPanelsPerTask, q1 = std::min(w.panels, q0 + kPanelsPerTask);
#ifdef SQ_X86
    if (avx512) return w.bits == 8 ? tile_avx512<8>(qa, m0, m1, w, q0, q1, bias, y) : tile_avx512<4>(qa, m0, m1, w, q0, q1, bias, y);
#endif
    tile_scalar(qa, m0, m1, w, q0, q1, bias, y);
  });
}

}  // namespace sq
