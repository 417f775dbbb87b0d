// The CPU int8 GEMM's vpdpbusd paths (CpuIsa::kAvx512Vnni, CpuIsa::kAvxVnni): the pieces tiled_gemm in
// cpu_kernels.cc calls when the CPU has VNNI. Same results as the other paths, bit for bit.
#pragma once
#include <cstdint>

#include "cpu_isa.h"

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

}  // namespace vnni
using vnni::is_vnni;
}  // namespace sq
