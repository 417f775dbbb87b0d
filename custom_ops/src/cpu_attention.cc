// See cpu_attention.h. Queries of kTile rows or more take a tiled path on K^T and V packed once per call (zero
// padded to 64 keys and 64 channels, so every register tile is whole); shorter ones (decode) read K and V as they
// are, one row at a time. The inner loops (cpu_attention.inc) are built for the baseline, AVX2 and AVX-512 with
// GCC's vector extensions and taken for the instruction set cpu_isa() names.
#include "cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_isa.h"

namespace sq {
namespace {

constexpr int64_t kTile = 16;  // query rows per task of the tiled path; shorter queries take the row path
constexpr int64_t kPad = 64;   // keys and channels of the packed K^T and V, a multiple of every register tile

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Plan {
  AttentionShape s;
  float scale = 1.0f;
  int64_t rep = 1, tp = 0, dp = 0;  // query heads per kv head; packed keys and channels
  const float *q = nullptr, *k = nullptr, *v = nullptr, *mask = nullptr;
  const float *kt = nullptr, *vp = nullptr;  // [B * Hk][D][tp], [B * Hk][tp][dp]
  float* out = nullptr;
};

const float* mask_row(const Plan& p, int64_t b, int64_t h, int64_t i) {
  if (p.mask == nullptr) return nullptr;
  const int64_t mb = p.s.mask_batch == 1 ? 0 : b, mh = p.s.mask_heads == 1 ? 0 : h, mi = p.s.mask_rows == 1 ? 0 : i;
  return p.mask + ((mb * p.s.mask_heads + mh) * p.s.mask_rows + mi) * p.s.kv_len;
}

// The keys a query row reads: up to its last unmasked one, or all when none is unmasked (see the header).
int64_t keys_needed(const float* mask, int64_t keys) {
  if (mask == nullptr) return keys;
  int64_t n = keys;
  while (n > 0 && mask[n - 1] <= kMaskedBelow) --n;
  return n == 0 ? keys : n;
}

namespace portable {
#define SQ_ATT_ATTR
#define SQ_ATT_LANES 4
#define SQ_ATT_ROWS 2
#define SQ_ATT_VECS 2
#include "cpu_attention.inc"
#undef SQ_ATT_ATTR
#undef SQ_ATT_LANES
#undef SQ_ATT_ROWS
#undef SQ_ATT_VECS
}  // namespace portable

#if defined(__x86_64__) || defined(__i386__)
namespace avx2 {
#define SQ_ATT_ATTR __attribute__((target("avx2,fma")))
#define SQ_ATT_LANES 8
#define SQ_ATT_ROWS 4
#define SQ_ATT_VECS 2
#include "cpu_attention.inc"
#undef SQ_ATT_ATTR
#undef SQ_ATT_LANES
#undef SQ_ATT_ROWS
#undef SQ_ATT_VECS
}  // namespace avx2

namespace avx512 {
#define SQ_ATT_ATTR __attribute__((target("avx2,fma,avx512f,prefer-vector-width=512")))
#define SQ_ATT_LANES 16
#define SQ_ATT_ROWS 4
#define SQ_ATT_VECS 4
#include "cpu_attention.inc"
#undef SQ_ATT_ATTR
#undef SQ_ATT_LANES
#undef SQ_ATT_ROWS
#undef SQ_ATT_VECS
}  // namespace avx512
#endif

using TileFn = void (*)(const Plan&, int64_t, int64_t, int64_t, int64_t, float*);
using RowFn = void (*)(const Plan&, int64_t, int64_t, int64_t, float*, float*);

std::pair<TileFn, RowFn> kernels() {
#if defined(__x86_64__) || defined(__i386__)
  switch (cpu_isa()) {
    case CpuIsa::kAvx512Vnni: return {avx512::attend_tile, avx512::attend_row};
    case CpuIsa::kAvxVnni:
    case CpuIsa::kAvx2: return {avx2::attend_tile, avx2::attend_row};
    default: break;
  }
#endif
  return {portable::attend_tile, portable::attend_row};
}

// K^T and V of one kv head, zero padded: kt [D][tp], vp [tp][dp]. K is transposed 16 keys at a time, so each
// store fills a cache line (column by column, the 2 KB stride of kt's rows made the copy cost as much as the maths).
void pack_kv(const Plan& p, int64_t kv, float* kt, float* vp) {
  const int64_t t_len = p.s.kv_len, d_len = p.s.head_size, tp = p.tp, dp = p.dp;
  const float* k = p.k + kv * t_len * d_len;
  const float* v = p.v + kv * t_len * d_len;
  for (int64_t j0 = 0; j0 < tp; j0 += 16) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, t_len - j0));
    for (int64_t d = 0; d < d_len; ++d) {
      float* dst = kt + d * tp + j0;
      for (int64_t jj = 0; jj < n; ++jj) dst[jj] = k[(j0 + jj) * d_len + d];
      for (int64_t jj = n; jj < 16; ++jj) dst[jj] = 0.0f;
    }
  }
  for (int64_t j = 0; j < tp; ++j) {
    float* dst = vp + j * dp;
    const int64_t n = j < t_len ? d_len : 0;
    if (n) std::memcpy(dst, v + j * d_len, n * sizeof(float));
    std::fill(dst + n, dst + dp, 0.0f);
  }
}

// Scratch of at least n floats, one per thread, kept across calls (every element is written before it is read).
float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

void masked_attention(const float* q, const float* k, const float* v, const float* mask, const AttentionShape& s,
                      float scale, float* out, const ParallelFor& pf) {
  Plan p;
  p.s = s;
  p.scale = scale;
  p.rep = s.heads / s.kv_heads;
  p.tp = round_up(s.kv_len, kPad);
  p.dp = round_up(s.head_size, kPad);
  p.q = q, p.k = k, p.v = v, p.mask = mask, p.out = out;
  if (s.q_len * s.kv_len * s.head_size * s.batch * s.heads == 0) return;
  const auto [tile, row] = kernels();
  if (s.q_len < kTile) {
    pf(static_cast<size_t>(s.batch * s.heads * s.q_len), [&](size_t task) {
      thread_local std::vector<float> buf;
      float* sc = scratch(buf, static_cast<size_t>(p.tp + s.head_size));
      const int64_t i = static_cast<int64_t>(task) % s.q_len, bh = static_cast<int64_t>(task) / s.q_len;
      row(p, bh / s.heads, bh % s.heads, i, sc, sc + p.tp);
    });
    return;
  }
  const int64_t kvs = s.batch * s.kv_heads;
  const size_t kt_size = static_cast<size_t>(s.head_size * p.tp), vp_size = static_cast<size_t>(p.tp * p.dp);
  thread_local std::vector<float> packed;  // the calling thread's, reused by the next layer
  float* base = scratch(packed, static_cast<size_t>(kvs) * (kt_size + vp_size));
  pf(static_cast<size_t>(kvs), [&](size_t kv) { pack_kv(p, static_cast<int64_t>(kv), base + kv * kt_size,
                                                        base + kvs * kt_size + kv * vp_size); });
  p.kt = base, p.vp = base + kvs * kt_size;
  const int64_t tiles = (s.q_len + kTile - 1) / kTile;
  pf(static_cast<size_t>(s.batch * s.heads * tiles), [&](size_t task) {
    thread_local std::vector<float> buf;
    float* sc = scratch(buf, static_cast<size_t>(kTile * p.tp));
    const int64_t t = static_cast<int64_t>(task) % tiles, bh = static_cast<int64_t>(task) / tiles;
    const int64_t i0 = t * kTile;
    tile(p, bh / s.heads, bh % s.heads, i0, std::min(kTile, s.q_len - i0), sc);
  });
}

}  // namespace sq
