// The CPU int8 GEMM on vpdpbusd: the kernels of cpu_gemm_vnni.inc, compiled once per instruction set that has
// the instruction, and the dispatch between them. See cpu_gemm_vnni.h.
//
// Built with -Wno-uninitialized under GCC: its AVX-512 intrinsics read an `undefined` vector on purpose and
// warn about it once inlined (GCC bug 105593); the warning lands in the system header, where no pragma reaches.
#include "cpu_gemm_vnni.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include "cpu_simd.h"

namespace sq {
namespace vnni {
namespace {

constexpr int64_t kTileN = kMaxTileCols;

// The four sums of a, b, c, d's eight lanes each, as one vector: two rounds of hadd within the 128-bit halves,
// then the halves added.
__attribute__((target("avx2"))) inline __m128i sum4_256(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

namespace avx512vnni {  // EVEX on 512-bit vectors: 32 registers
#define SQ_VNNI_TARGET "avx2,avx512f,avx512bw,avx512vnni"
#define SQ_V __attribute__((target(SQ_VNNI_TARGET))) static
struct Vec {
  using V = __m512i;
  static constexpr int kBytes = 64, kNr = 4;  // 16 accumulators of 32 registers
  static constexpr int kMrPacked = 6, kNpPacked = 4;  // packed W: 24 accumulators, 4 panels, 1 broadcast
  SQ_V V load(const void* p) { return _mm512_loadu_si512(p); }
  SQ_V void store(void* p, V v) { _mm512_storeu_si512(p, v); }
  SQ_V V zero() { return _mm512_setzero_si512(); }
  SQ_V V bytes(char c) { return _mm512_set1_epi8(c); }
  SQ_V V xor_(V a, V b) { return _mm512_xor_si512(a, b); }
  SQ_V V sub32(V a, V b) { return _mm512_sub_epi32(a, b); }  // wraps, as the compensation needs
  // 16 rows of 64 bytes (row stride ld) to 16 vectors of one 4-byte group from each row: a 16 x 16 transpose of
  // int32 (32-bit and 64-bit interleaves within 128-bit lanes, then two rounds of lane shuffles).
  static constexpr bool kTransposes = true;
  SQ_V void transpose_block(const int8_t* src, int64_t ld, int8_t* dst) {
    V r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = load(src + i * ld);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int q = 0; q < 4; ++q) {  // u[4q + j]: rows 4q..4q+3 of groups j, j + 4, j + 8, j + 12 (one per lane)
      r[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
      r[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
      r[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
      r[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int j = 0; j < 4; ++j) {
      const V a0 = _mm512_shuffle_i32x4(r[j], r[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
      const V a1 = _mm512_shuffle_i32x4(r[j], r[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
      const V b0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
      const V b1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
      store(dst + (j + 0) * 64, _mm512_shuffle_i32x4(a0, b0, _MM_SHUFFLE(2, 0, 2, 0)));
      store(dst + (j + 4) * 64, _mm512_shuffle_i32x4(a0, b0, _MM_SHUFFLE(3, 1, 3, 1)));
      store(dst + (j + 8) * 64, _mm512_shuffle_i32x4(a1, b1, _MM_SHUFFLE(2, 0, 2, 0)));
      store(dst + (j + 12) * 64, _mm512_shuffle_i32x4(a1, b1, _MM_SHUFFLE(3, 1, 3, 1)));
    }
  }
  SQ_V V broadcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  // In place, as inline assembly: around the intrinsic, GCC 12 copied every accumulator to a fresh register
  // and back on each step (one core, 256 x 4096 x 4096: 491 GOPS with it, 685-693 without).
  SQ_V V dpbusd(V acc, V u, V s) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
  }
  SQ_V int32_t sum(V v) { return _mm512_reduce_add_epi32(v); }
  SQ_V __m128i sum4(V a, V b, V c, V d) {  // halves added, then the 256-bit form's tree
    return sum4_256(half_sum(a), half_sum(b), half_sum(c), half_sum(d));
  }
  SQ_V __m256i half_sum(V v) { return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)); }
};
#undef SQ_V
#include "cpu_gemm_vnni.inc"
#undef SQ_VNNI_TARGET
}  // namespace avx512vnni
#ifdef SQ_HAVE_AVXVNNI
namespace avxvnni {  // VEX on 256-bit vectors: 16 registers
#define SQ_VNNI_TARGET "avx2,avxvnni"
#define SQ_V __attribute__((target(SQ_VNNI_TARGET))) static
struct Vec {
  using V = __m256i;
  static constexpr int kBytes = 32, kNr = 2;  // 8 accumulators of 16 registers
  static constexpr int kMrPacked = 4, kNpPacked = 2;  // packed W: 8 accumulators, 2 panels, 1 broadcast
  SQ_V V load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  SQ_V void store(void* p, V v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  SQ_V V zero() { return _mm256_setzero_si256(); }
  SQ_V V bytes(char c) { return _mm256_set1_epi8(c); }
  SQ_V V xor_(V a, V b) { return _mm256_xor_si256(a, b); }
  SQ_V V sub32(V a, V b) { return _mm256_sub_epi32(a, b); }
  // 8 rows of 32 bytes (row stride ld) to 8 vectors of one 4-byte group from each row: an 8 x 8 transpose of
  // int32 (32-bit and 64-bit interleaves within 128-bit lanes, then the lanes exchanged). One core, 1536 x 576:
  // packing from memory 113 -> 42 us, against 4-byte copies.
  static constexpr bool kTransposes = true;
  SQ_V void transpose_block(const int8_t* src, int64_t ld, int8_t* dst) {
    V r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = load(src + i * ld);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3: u[4h + j] holds groups j (low lane) and j + 4 (high lane)
      r[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
      r[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
      r[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
      r[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int j = 0; j < 4; ++j) {
      store(dst + j * 32, _mm256_permute2x128_si256(r[j], r[4 + j], 0x20));
      store(dst + (j + 4) * 32, _mm256_permute2x128_si256(r[j], r[4 + j], 0x31));
    }
  }
  SQ_V V broadcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  SQ_V V dpbusd(V acc, V u, V s) {  // in place, as for AVX512-VNNI (316 -> 417 GOPS here)
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
    return acc;
  }
  SQ_V int32_t sum(V v) { return hsum256(v); }
  SQ_V __m128i sum4(V a, V b, V c, V d) { return sum4_256(a, b, c, d); }
};
#undef SQ_V
#include "cpu_gemm_vnni.inc"
#undef SQ_VNNI_TARGET
}  // namespace avxvnni
#endif

}  // namespace

void gemm_tile(CpuIsa isa, const int8_t* xq, const int8_t* wq, int64_t k, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1, int32_t* acc, int64_t ldo) {
  if (isa == CpuIsa::kAvx512Vnni) return avx512vnni::gemm_tile(xq, wq, k, m0, m1, n0, n1, acc, ldo);
#ifdef SQ_HAVE_AVXVNNI
  avxvnni::gemm_tile(xq, wq, k, m0, m1, n0, n1, acc, ldo);
#endif
}

void flip_row(CpuIsa isa, const int8_t* x, int64_t k, uint8_t* xu) {
  if (isa == CpuIsa::kAvx512Vnni) return avx512vnni::flip_row(x, k, xu);
#ifdef SQ_HAVE_AVXVNNI
  avxvnni::flip_row(x, k, xu);
#endif
}

void gemv_block(CpuIsa isa, const uint8_t* xu, const int8_t* x, const int8_t* wq, int64_t k, int64_t n0, int64_t n1,
                int32_t* acc) {
  if (isa == CpuIsa::kAvx512Vnni) return avx512vnni::gemv_block(xu, x, wq, k, n0, n1, acc);
#ifdef SQ_HAVE_AVXVNNI
  avxvnni::gemv_block(xu, x, wq, k, n0, n1, acc);
#endif
}

namespace {
// Columns per panel (one int32 lane each) and the per-instruction-set kernels behind the packed paths.
int64_t panel_cols(CpuIsa isa) { return isa == CpuIsa::kAvx512Vnni ? 16 : 8; }

void pack_panel(CpuIsa isa, const int8_t* wq, int64_t n, int64_t k, int64_t kp, int64_t c0, int8_t* dst,
                int32_t* comp) {
  if (isa == CpuIsa::kAvx512Vnni) return avx512vnni::pack_panel(wq, n, k, kp, c0, dst, comp);
#ifdef SQ_HAVE_AVXVNNI
  avxvnni::pack_panel(wq, n, k, kp, c0, dst, comp);
#endif
}

void tile_packed(CpuIsa isa, const uint8_t* xu, int64_t kp, const int8_t* panels, const int32_t* comp, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, int32_t* acc, int64_t ldo) {
  if (isa == CpuIsa::kAvx512Vnni) return avx512vnni::tile_packed(xu, kp, panels, comp, m0, m1, n0, n1, acc, ldo);
#ifdef SQ_HAVE_AVXVNNI
  avxvnni::tile_packed(xu, kp, panels, comp, m0, m1, n0, n1, acc, ldo);
#endif
}
}  // namespace

PackedW pack_weights(CpuIsa isa, const int8_t* wq, int64_t n, int64_t k, const ParallelFor& pf) {
  PackedW w;
  w.kp = (k + 3) / 4 * 4;
  w.panel_cols = panel_cols(isa);
  const int64_t panels = (n + w.panel_cols - 1) / w.panel_cols;
  const int64_t panel_bytes = w.kp * w.panel_cols;
  w.data.reset(new int8_t[static_cast<size_t>(panels * panel_bytes)]);
  w.comp.resize(static_cast<size_t>(panels * w.panel_cols));
  pf(static_cast<size_t>(panels), [&](size_t p) {
    const int64_t c0 = static_cast<int64_t>(p) * w.panel_cols;
    pack_panel(isa, wq, n, k, w.kp, c0, w.data.get() + static_cast<int64_t>(p) * panel_bytes, w.comp.data() + c0);
  });
  return w;
}

std::vector<uint8_t> flip_rows(CpuIsa isa, const int8_t* xq, int64_t m, int64_t k, int64_t kp) {
  std::vector<uint8_t> xu(static_cast<size_t>(m * kp));
  if (isa == CpuIsa::kAvx512Vnni) {
    avx512vnni::flip_rows_padded(xq, m, k, kp, xu.data());
  } else {
#ifdef SQ_HAVE_AVXVNNI
    avxvnni::flip_rows_padded(xq, m, k, kp, xu.data());
#endif
  }
  return xu;
}

void gemm_tile_packed(CpuIsa isa, const uint8_t* xu, const PackedW& w, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                      int32_t* acc, int64_t ldo) {
  tile_packed(isa, xu, w.kp, w.data.get(), w.comp.data(), m0, m1, n0, n1, acc, ldo);
}

void pack_block(CpuIsa isa, const int8_t* wq, int64_t n, int64_t k, int64_t kp, int64_t n0, int8_t* block,
                int32_t* comp) {
  const int64_t cols = std::min(kMaxTileCols, n - n0), pc = panel_cols(isa);
  for (int64_t p = 0; p * pc < cols; ++p) pack_panel(isa, wq, n, k, kp, n0 + p * pc, block + p * kp * pc, comp + p * pc);
}

void gemm_block_packed(CpuIsa isa, const uint8_t* xu, int64_t kp, const int8_t* block, const int32_t* comp, int64_t m0,
                       int64_t m1, int64_t cols, int32_t* acc, int64_t ldo) {
  tile_packed(isa, xu, kp, block, comp, m0, m1, 0, cols, acc, ldo);
}

}  // namespace vnni

std::shared_ptr<const PrepackedWeights> prepack_weights(const int8_t* wq, int64_t n, int64_t k) {
  const CpuIsa isa = cpu_isa();
  const char* env = std::getenv("SQ_ONNX_CPU_PREPACK");
  if (!env || std::strcmp(env, "1") != 0 || !is_vnni(isa) || n <= 0 || k <= 0) return nullptr;
  return std::make_shared<const PrepackedWeights>(
      PrepackedWeights{vnni::pack_weights(isa, wq, n, k, serial_for()), isa, wq, n, k});
}

}  // namespace sq

#else  // no x86: cpu_isa() never picks a VNNI path

namespace sq {
namespace vnni {
void gemm_tile(CpuIsa, const int8_t*, const int8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int32_t*, int64_t) {}
void flip_row(CpuIsa, const int8_t*, int64_t, uint8_t*) {}
void gemv_block(CpuIsa, const uint8_t*, const int8_t*, const int8_t*, int64_t, int64_t, int64_t, int32_t*) {}
PackedW pack_weights(CpuIsa, const int8_t*, int64_t, int64_t, const ParallelFor&) { return {}; }
std::vector<uint8_t> flip_rows(CpuIsa, const int8_t*, int64_t, int64_t, int64_t) { return {}; }
void gemm_tile_packed(CpuIsa, const uint8_t*, const PackedW&, int64_t, int64_t, int64_t, int64_t, int32_t*, int64_t) {}
void pack_block(CpuIsa, const int8_t*, int64_t, int64_t, int64_t, int64_t, int8_t*, int32_t*) {}
void gemm_block_packed(CpuIsa, const uint8_t*, int64_t, const int8_t*, const int32_t*, int64_t, int64_t, int64_t,
                       int32_t*, int64_t) {}
}  // namespace vnni
std::shared_ptr<const PrepackedWeights> prepack_weights(const int8_t*, int64_t, int64_t) { return nullptr; }
}  // namespace sq
#endif
