// CUDA on the CPU, for tests: the runtime that runs kernels. A launch runs its blocks one after another, a
// block's threads as fibers on the calling thread; __syncthreads and the warp collectives are barriers among
// them (the collectives' results come from ptx_emu.h and device_builtins_emu.h). A launch fails where a GPU
// would reject it (grid and block limits, dynamic shared memory over the kernel's limit) or fault in it
// (misaligned 16-byte accesses, a barrier some threads of the block or warp never reach). The headers under
// include/ stand in for CUDA's, so custom_ops/src/cuda_kernels.cu compiles as C++ (tests/cuda_emulation.py).
#pragma once
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api_emu.h"

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
// Registers static shared storage; the emulator fills every registered region with 0xA5 at each block's
// start (and now), as a GPU's shared memory holds whatever was there.
void register_block_shared(void* p, size_t bytes);
// `__shared__ T name[n]...;` is rewritten to `auto& name = block_shared<T[n]..., line>();`.
template <class Array, int kLine>
Array& block_shared() {
  alignas(16) static Array storage;
  static const bool registered = (register_block_shared(&storage, sizeof storage), true);
  (void)registered;
  return storage;
}
}  // namespace sq_emu
