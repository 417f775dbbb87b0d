// 4- or 8-bit weights times int8 activations: the arithmetic of com.microsoft::MatMulNBits at accuracy_level 4
// (MLAS's CompInt8), computed with vpdpbusd on whole vectors of output columns.
//
// A is quantized per block of `block` values along K, as MLAS's QuantizeARow_CompInt8 does: scale =
// max|a| / 127, codes = round-half-even(a * (127 / max|a|)), a block of zeros stays zero. Then
//   y[m][n] = sum_b sa[m][b] * sw[n][b] * sum_{k in b} aq[m][k] * (code[n][k] - zp[n][b])  (+ bias[n])
// with the int8 x 4-bit products summed exactly in int32 per block and the blocks summed in float.
//
// The codes are unsigned (0..15, 0..255), so they are vpdpbusd's unsigned operand and A its signed one: no
// offset, and the zero point comes out as zp * sum(aq) per block. W is repacked once (at session creation for an
// initializer) into panels of 16 columns, one int32 lane each, so no output needs a horizontal sum. 4 bits: for
// every block, block / 8 vectors of 64 bytes, byte c * 4 + i of vector v holding k = 4v + i of column c in its low
// nibble and k = 4(v + block / 8) + i in its high nibble (one load and two masks: 128 products per lane group).
// 8 bits: block / 4 vectors, byte c * 4 + i of vector v holding k = 4v + i of column c.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_kernels.h"

namespace sq {

constexpr int64_t kNBitsPanelCols = 16;

struct NBitsPacked {
  int64_t n = 0, k = 0, block = 0, blocks = 0, panels = 0, bits = 4;
  std::vector<uint8_t> codes;  // [panels][blocks][block * bits / 32 vectors][16 columns][4 bytes], zeros past N, K
  std::vector<float> scale;    // [panels][blocks][16]: the weight scale (0 past N)
  std::vector<float> zscale;   // [panels][blocks][16]: zero point x scale
  int64_t block_code_bytes() const { return block * 2 * bits; }  // one block of one panel
  int64_t panel_code_bytes() const { return blocks * block_code_bytes(); }
};

// From MatMulNBits' inputs: b [N][blocks][block * bits / 8] (4 bits: two codes per byte, low nibble first),
// scales [N * blocks], zero_points [N][ceil(blocks * bits / 8)] (4 bits: two per byte, low nibble first) or nullptr
// (2^(bits - 1)). bits: 4 or 8; block: a multiple of 8.
std::shared_ptr<const NBitsPacked> pack_nbits(const uint8_t* b, const float* scales, const uint8_t* zero_points,
                                              int64_t n, int64_t k, int64_t block, int64_t bits);

// y [M, N] = A [M, K] times the weights above (plus bias [N] when given), A quantized per block as described.
void nbits_a8_matmul(const float* a, int64_t m, const NBitsPacked& w, const float* bias, float* y, const ParallelFor& pf);

}  // namespace sq
