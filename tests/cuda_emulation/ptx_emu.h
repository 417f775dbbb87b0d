// The PTX helpers of cuda_kernels.cu (its #ifndef SQ_ONNX_CUDA_ON_CPU block) as warp collectives of the CPU
// emulation, computed from the PTX ISA's fragment layouts.
#pragma once
#include <cstdint>
#include <cstring>

#include "sq_cuda_emu.h"

// ---- the PTX helpers of cuda_kernels.cu ----------------------------------------------------------------
// Shared-memory addresses are offsets into the block's dynamic shared memory.
inline uint32_t smem_addr(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < sq_emu::shared_base() || b > sq_emu::shared_base() + sq_emu::shared_bytes())
    sq_emu::fault("smem_addr: not in the block's dynamic shared memory");
  return static_cast<uint32_t>(b - sq_emu::shared_base());
}
inline void cp_async16(uint32_t dst, const void* src, int bytes) { sq_emu::cp_async(dst, src, bytes); }
inline void cp_async_commit() { sq_emu::cp_async_commit(); }
template <int kPending>
void cp_async_wait() {
  sq_emu::cp_async_wait(kPending);
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes
// each); lane l receives, from each matrix i, bytes 4 (l % 4) .. +3 of its row l / 4.
inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const unsigned char* all = sq_emu::warp_exchange(&addr, sizeof addr, sq_emu::kLdmatrix);
  const int l = sq_emu::lane();
  uint32_t r[4];
  for (int i = 0; i < 4; ++i) {
    uint32_t row;
    std::memcpy(&row, all + (i * 8 + l / 4) * sq_emu::kSlotBytes, sizeof row);
    if (row % 16 != 0) sq_emu::fault("ldmatrix: row address not 16-byte aligned");
    if (row + 16 > sq_emu::shared_bytes()) sq_emu::fault("ldmatrix: row past the dynamic shared memory");
    std::memcpy(&r[i], sq_emu::shared_base() + row + (l % 4) * 4, 4);
  }
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, D = A B + C with groupID g = lane / 4 and
// t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k32"): A (16 x 32) a0: row g, k 4t..4t+3; a1: row
// g + 8, same k; a2: row g, k 16 + 4t..; a3: row g + 8, k 16 + 4t... B (32 x 8) b0: k 4t..4t+3, column g;
// b1: k 16 + 4t.., column g. C, D: c0, c1 row g, columns 2t, 2t + 1; c2, c3 row g + 8. Sums wrap at 32 bits.
inline void mma_s8(int32_t* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const unsigned char* all = sq_emu::warp_exchange(mine, sizeof mine, sq_emu::kMma);
  auto byte = [&](int lane, int reg, int i) {
    return static_cast<int32_t>(static_cast<int8_t>(all[lane * sq_emu::kSlotBytes + reg * 4 + i]));
  };
  int8_t am[16][32], bm[32][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, t = ln % 4;
    for (int i = 0; i < 4; ++i) {
      am[g][4 * t + i] = static_cast<int8_t>(byte(ln, 0, i));
      am[g + 8][4 * t + i] = static_cast<int8_t>(byte(ln, 1, i));
      am[g][16 + 4 * t + i] = static_cast<int8_t>(byte(ln, 2, i));
      am[g + 8][16 + 4 * t + i] = static_cast<int8_t>(byte(ln, 3, i));
      bm[4 * t + i][g] = static_cast<int8_t>(byte(ln, 4, i));
      bm[16 + 4 * t + i][g] = static_cast<int8_t>(byte(ln, 5, i));
    }
  }
  const int g = sq_emu::lane() / 4, t = sq_emu::lane() % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
    uint32_t acc = static_cast<uint32_t>(c[r]);
    for (int kk = 0; kk < 32; ++kk)
      acc += static_cast<uint32_t>(static_cast<int32_t>(am[row][kk]) * static_cast<int32_t>(bm[kk][col]));
    c[r] = static_cast<int32_t>(acc);
  }
}
