// The CPU int8 GEMM's vpdpbusd paths (CpuIsa::kAvx512Vnni, CpuIsa::kAvxVnni): the pieces tiled_gemm in
// cpu_kernels.cc calls when the CPU has VNNI. Same results as the other paths, bit for bit.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_isa.h"
#include "cpu_kernels.h"

namespace sq {
namespace vnni {

constexpr int64_t kMaxTileCols = 64;

inline bool is_vnni(CpuIsa isa) { return isa == CpuIsa::kAvxVnni || isa == CpuIsa::kAvx512Vnni; }

// acc[(m - m0) * ldo + (n - n0)] = sum_k xq[m][k] wq[n][k] over the tile [m0, m1) x [n0, n1), n1 - n0 <=
// kMaxTileCols; X [M, K] and W [N, K] row-major.
void gemm_tile(CpuIsa isa, const int8_t* xq, const int8_t* wq, int64_t k, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1, int32_t* acc, int64_t ldo);

// One row of X (decode): flip_row writes xu = x ^ 0x80 (at most k bytes), once; gemv_block then gives
// acc[j - n0] = sum_k x[k] wq[j][k] for columns [n0, n1).
void flip_row(CpuIsa isa, const int8_t* x, int64_t k, uint8_t* xu);
void gemv_block(CpuIsa isa, const uint8_t* xu, const int8_t* x, const int8_t* wq, int64_t k, int64_t n0, int64_t n1,
                int32_t* acc);

// Many rows: W repacked once per call into panels of one vector of columns, K in groups of 4 bytes
// ([K/4][columns][4]), so the inner loop broadcasts 4 bytes of X against whole vectors of columns: every lane
// is one output, no horizontal sums. Repacking costs a pass over W on every call (SmolLM2: about 100 MB per
// forward pass), which the faster loop repays from kPackedMinRows rows: in the whole model, prefill of 256 and
// 512 tokens measured 4-7% faster with it than row-major, and at 256 tokens 5% faster than packing by blocks
// (below); 512 even.
constexpr int64_t kPackedMinRows = 256;

struct PackedW {
  int64_t kp = 0;             // K rounded up to 4 (zeros past K)
  int64_t panel_cols = 0;     // columns per panel: 16 (AVX512-VNNI) or 8 (AVX-VNNI)
  std::unique_ptr<int8_t[]> data;  // whole panels, zeros past N (not value-initialised: packing writes all)
  std::vector<int32_t> comp;  // 128 * sum_k w[n][k] per column, as the shifted X needs
};
PackedW pack_weights(CpuIsa isa, const int8_t* wq, int64_t n, int64_t k, const ParallelFor& pf);
// xu [m][kp] = x ^ 0x80, K padded with x = 0.
std::vector<uint8_t> flip_rows(CpuIsa isa, const int8_t* xq, int64_t m, int64_t k, int64_t kp);
// acc as gemm_tile's, for a tile whose n0 is a multiple of kMaxTileCols; columns past n1 up to the tile's last
// panel are written too (within the tile's kMaxTileCols).
void gemm_tile_packed(CpuIsa isa, const uint8_t* xu, const PackedW& w, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                      int32_t* acc, int64_t ldo);

// Fewer rows: one block of kMaxTileCols columns at a time, packed just before its rows use it (in cache, into a
// buffer the caller reuses), so W is read once and nothing the size of W is written. From kBlockPackMinRows rows
// the packed loop repays the packing; below, gemm_tile is faster.
constexpr int64_t kBlockPackMinRows = 48;
constexpr int64_t block_bytes(int64_t kp) { return kp * kMaxTileCols; }
// Columns [n0, min(n, n0 + kMaxTileCols)) of W, n0 a multiple of kMaxTileCols, laid out as pack_weights lays out
// its panels: block (block_bytes(kp) bytes), comp (kMaxTileCols).
void pack_block(CpuIsa isa, const int8_t* wq, int64_t n, int64_t k, int64_t kp, int64_t n0, int8_t* block,
                int32_t* comp);
// acc[(m - m0) * ldo + c] for rows [m0, m1) and the block's columns c < cols (whole panels are written).
void gemm_block_packed(CpuIsa isa, const uint8_t* xu, int64_t kp, const int8_t* block, const int32_t* comp, int64_t m0,
                       int64_t m1, int64_t cols, int32_t* acc, int64_t ldo);

}  // namespace vnni
using vnni::is_vnni;

// prepack_weights' result (cpu_kernels.h): W's panels for one VNNI instruction set, and what they were made from.
struct PrepackedWeights {
  vnni::PackedW w;
  CpuIsa isa;
  const int8_t* source;
  int64_t n, k;
  bool serves(CpuIsa now, const int8_t* wq, int64_t rows, int64_t cols) const {
    return isa == now && source == wq && n == rows && k == cols;
  }
};
}  // namespace sq
