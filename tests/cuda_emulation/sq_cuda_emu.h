// CUDA on the CPU, for tests: enough of the runtime API, the device built-ins and the PTX helpers of
// custom_ops/src/cuda_kernels.cu that the kernels' own source compiles as C++ and runs. A block's threads
// are fibers on one OS thread; __syncthreads and the warp collectives (shuffles, ldmatrix, mma.sync) are
// barriers among them, and each collective computes its lanes' results from the PTX fragment layouts. A
// launch checks what a GPU would reject (grid and block limits, dynamic shared memory over the kernel's
// limit, misaligned 16-byte accesses, a barrier some threads of the block or warp never reach).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- runtime API types ---------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
using cudaStream_t = struct CUstream_st*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);

namespace sq_emu {
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}  // namespace sq_emu
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  return sq_emu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return sq_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- the emulated threads ------------------------------------------------------------------------------
namespace sq_emu {
struct ThreadIds {
  dim3 thread, block, block_dim, grid_dim;
};
const ThreadIds& ids();                 // the running fiber's
int lane();                              // its lane in the warp
void sync_block();                       // __syncthreads
constexpr size_t kSlotBytes = 32;        // what one lane may publish to a warp collective
enum Collective { kShuffle = 1, kLdmatrix, kMma };
// Publishes `bytes` of this lane's `data`, waits for all 32 lanes of the warp at the same collective, and
// returns the 32 lanes' payloads (lane i at i * kSlotBytes), valid until this lane's next collective.
const unsigned char* warp_exchange(const void* data, size_t bytes, Collective what);
[[noreturn]] void fault(const char* what);  // a kernel error: the launch fails with it
unsigned char* shared_base();            // the block's dynamic shared memory
size_t shared_bytes();
void cp_async(uint32_t dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait(int pending);

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg);

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to launch(kernel, grid, block, smem, stream,
// args...) by the test build (tests/cuda_emulation.py).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
           [](void* c) {
             auto* self = static_cast<Call*>(c);
             std::apply(self->kernel, self->params);  // each thread gets its own copy of the parameters
           },
           &call);
}
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(shared_base());
}
}  // namespace sq_emu

// ---- device built-ins ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time: a static is the block's shared copy
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
