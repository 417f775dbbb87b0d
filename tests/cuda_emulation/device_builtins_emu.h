// CUDA's device-side keywords and built-ins (threadIdx, __syncthreads, __shfl_xor_sync, __ldg, __dp4a, the
// __f*_rn operations) on the CPU emulation's fibers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sq_cuda_emu.h"

// ---- device built-ins ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::sq_emu::ids().thread)
#define blockIdx (::sq_emu::ids().block)
#define blockDim (::sq_emu::ids().block_dim)
#define gridDim (::sq_emu::ids().grid_dim)

inline void __syncthreads() { sq_emu::sync_block(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sq_emu::kSlotBytes && std::is_trivially_copyable_v<T>);
  if (mask != 0xffffffffu) sq_emu::fault("__shfl_xor_sync: only full-warp masks are emulated");
  const unsigned char* all = sq_emu::warp_exchange(&v, sizeof v, sq_emu::kShuffle);
  T out;
  std::memcpy(&out, all + ((sq_emu::lane() ^ lane_mask) & 31) * sq_emu::kSlotBytes, sizeof out);
  return out;
}

template <class T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) sq_emu::fault("__ldg: misaligned address");
  return *p;
}

inline int __dp4a(int a, int b, int c) {
  int8_t x[4], y[4];
  std::memcpy(x, &a, 4);
  std::memcpy(y, &b, 4);
  uint32_t acc = static_cast<uint32_t>(c);  // wraps like the hardware's 32-bit sum
  for (int i = 0; i < 4; ++i) acc += static_cast<uint32_t>(static_cast<int32_t>(x[i]) * static_cast<int32_t>(y[i]));
  return static_cast<int>(acc);
}

inline float __fadd_rn(float a, float b) { return a + b; }  // built with -ffp-contract=off: no fused forms
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
