// The CPU emulation's runtime: blocks run one after another, a block's threads as ucontext fibers on the
// calling thread, switched at __syncthreads and at warp collectives. See sq_cuda_emu.h.
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "sq_cuda_emu.h"

#ifndef SQ_ONNX_CUDA_MAX_GRID_Y
#define SQ_ONNX_CUDA_MAX_GRID_Y 65535
#endif

namespace sq_emu {
namespace {

// The emulated device (sq_emu_configure).
struct Device {
  int optin_smem = 64 * 1024, sm_count = 4, major = 8, minor = 0;
  int schedule = 0;        // order threads run in: 0 by thread id, 1 reversed, 2 shuffled
  int lockstep = 0;        // 0: warp-serial, 1: lockstep (run_block)
  int cp_async_late = 0;   // 0: cp.async copies at issue; 1: at the wait that retires its group
  unsigned seed = 1;
};
Device g_device;
cudaError_t g_last_error = cudaSuccess;
std::string g_fault;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kStaticSmemGuess = 1024;  // cudaFuncGetAttributes' sharedSizeBytes: not known here
constexpr size_t kStackBytes = 256 * 1024;
long g_launches = 0;
std::vector<std::pair<void*, size_t>> g_block_shared;  // static __shared__ arrays (block_shared)
struct LaunchRecord {
  unsigned grid_x, grid_y, block;
  size_t smem;
} g_last_launch{};

enum class State { kReady, kAtBlockBarrier, kAtWarp, kDone };
struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
};
struct Fiber {
  ucontext_t ctx;
  ThreadIds ids;
  State state = State::kReady;
  Collective collective = kShuffle;
  int phase = 0;  // the warp slot set its last collective published to
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> committed;
};
struct Warp {
  int phase = 0;
  unsigned char slots[2][32][kSlotBytes];
};
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  ucontext_t scheduler;
  int current = -1;
  bool failed = false;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};
Block* g_block = nullptr;
std::vector<std::unique_ptr<char[]>> g_stacks;

Fiber& me() { return g_block->fibers[static_cast<size_t>(g_block->current)]; }
void yield() { swapcontext(&me().ctx, &g_block->scheduler); }

void do_copy(const Copy& c) {
  unsigned char* dst = g_block->smem.data() + c.dst;
  if (c.bytes > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.bytes));
  std::memset(dst + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
}

void fiber_main() {
  g_block->body(g_block->arg);
  for (auto& group : me().committed)
    for (const Copy& c : group) do_copy(c);
  me().state = State::kDone;  // uc_link returns to the scheduler
}

[[noreturn]] void fail_block(const std::string& what) {
  if (g_fault.empty()) g_fault = what;
  g_block->failed = true;
  swapcontext(&me().ctx, &g_block->scheduler);
  std::abort();  // a failed block is never resumed
}

// Frees warp w's collective once all its lanes are at it; false when it cannot (yet), with g_fault set where
// it never can (lanes that exited, or lanes at different collectives).
bool release_warp(Block& b, size_t w) {
  Fiber* lanes = &b.fibers[w * 32];
  int at = 0;
  for (int l = 0; l < 32; ++l) at += lanes[l].state == State::kAtWarp;
  if (at == 0) return false;
  if (at < 32) {
    for (int l = 0; l < 32; ++l)
      if (lanes[l].state == State::kDone && g_fault.empty())
        g_fault = "warp " + std::to_string(w) + ": a collective while lane " + std::to_string(l) + " has exited";
    return false;
  }
  for (int l = 1; l < 32; ++l)
    if (lanes[l].collective != lanes[0].collective) {
      if (g_fault.empty()) g_fault = "warp " + std::to_string(w) + ": its lanes are at different collectives";
      return false;
    }
  for (int l = 0; l < 32; ++l) lanes[l].state = State::kReady;
  b.warps[w].phase ^= 1;
  return true;
}

// Frees __syncthreads once every thread is at it (threads that returned count as arrived).
bool release_block(Block& b) {
  size_t done = 0, at_block = 0;
  for (const Fiber& f : b.fibers) {
    done += f.state == State::kDone;
    at_block += f.state == State::kAtBlockBarrier;
  }
  if (at_block == 0 || at_block + done != b.fibers.size()) return false;
  for (Fiber& f : b.fibers)
    if (f.state == State::kAtBlockBarrier) f.state = State::kReady;
  return true;
}

// Runs the ready fibers among `which`, in that order, each to its next barrier; whether any ran.
bool run_ready(Block& b, const std::vector<size_t>& which) {
  bool ran = false;
  for (size_t i : which) {
    if (b.fibers[i].state != State::kReady) continue;
    b.current = static_cast<int>(i);
    swapcontext(&b.scheduler, &b.fibers[i].ctx);
    ran = true;
    if (b.failed) return ran;
  }
  return ran;
}

// `order`: the threads in the order they run. Warp-serial (the default): each warp in turn runs on through
// its collectives until all its threads wait at __syncthreads or have returned, so a warp reads shared memory
// before the warps after it have written theirs, as a missing barrier would allow on a GPU. Lockstep: every
// thread runs to its next barrier before any barrier is freed.
void run_block(Block& b, const std::vector<size_t>& order, bool lockstep) {
  for (size_t i = 0; i < b.fibers.size(); ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<std::vector<size_t>> warp_lanes;  // warps in the order their first thread appears in `order`
  std::vector<size_t> warp_of_slot(b.warps.size(), SIZE_MAX);
  for (size_t i : order) {
    size_t w = i / 32;
    if (warp_of_slot[w] == SIZE_MAX) warp_of_slot[w] = warp_lanes.size(), warp_lanes.emplace_back();
    warp_lanes[warp_of_slot[w]].push_back(i);
  }
  for (;;) {
    bool progressed = false;
    if (lockstep) {
      progressed = run_ready(b, order);
      for (size_t w = 0; w < b.warps.size() && !b.failed; ++w) progressed |= release_warp(b, w);
    } else {
      for (const auto& lanes : warp_lanes) {
        while (!b.failed && (run_ready(b, lanes) || release_warp(b, lanes[0] / 32))) progressed = true;
      }
    }
    if (b.failed) return;
    if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; }))
      return;
    progressed |= release_block(b);
    if (!g_fault.empty() || !progressed) {
      if (g_fault.empty()) g_fault = "deadlock: a barrier that not every thread of the block or warp reaches";
      b.failed = true;
      return;
    }
  }
}

bool check_launch_config(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const unsigned long threads = static_cast<unsigned long>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > SQ_ONNX_CUDA_MAX_GRID_Y ||
      grid.z > 65535 || threads == 0 || threads > 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return false;
  }
  auto it = g_max_dynamic_smem.find(kernel);
  const int limit = it == g_max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
  if (smem > static_cast<size_t>(limit)) {
    g_last_error = cudaErrorInvalidValue;
    return false;
  }
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0) {
    g_fault = "the emulation takes one-dimensional blocks of whole warps";
    g_last_error = cudaErrorLaunchFailure;
    return false;
  }
  return true;
}

}  // namespace

const ThreadIds& ids() { return me().ids; }
void register_block_shared(void* p, size_t bytes) {
  g_block_shared.emplace_back(p, bytes);
  std::memset(p, 0xA5, bytes);
}
int lane() { return static_cast<int>(me().ids.thread.x % 32); }
unsigned char* shared_base() { return g_block->smem.data(); }
size_t shared_bytes() { return g_block->smem.size(); }

void sync_block() {
  me().state = State::kAtBlockBarrier;
  yield();
}

const unsigned char* warp_exchange(const void* data, size_t bytes, Collective what) {
  Fiber& f = me();
  Warp& w = g_block->warps[f.ids.thread.x / 32];
  f.phase = w.phase;
  std::memcpy(w.slots[f.phase][lane()], data, bytes);
  f.collective = what;
  f.state = State::kAtWarp;
  yield();
  return &g_block->warps[me().ids.thread.x / 32].slots[me().phase][0][0];
}

void fault(const char* what) { fail_block(what); }

void cp_async(uint32_t dst, const void* src, int bytes) {
  if (dst % 16 != 0) fail_block("cp.async: shared address not 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail_block("cp.async: global address not 16-byte aligned");
  if (bytes < 0 || bytes > 16) fail_block("cp.async: source size outside 0..16");
  if (dst + 16 > shared_bytes()) fail_block("cp.async: past the dynamic shared memory");
  if (g_device.cp_async_late)
    me().open_group.push_back({dst, src, bytes});
  else
    do_copy({dst, src, bytes});
}
void cp_async_commit() {
  Fiber& f = me();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}
void cp_async_wait(int pending) {
  Fiber& f = me();
  while (f.committed.size() > static_cast<size_t>(pending)) {
    for (const Copy& c : f.committed.front()) do_copy(c);
    f.committed.erase(f.committed.begin());
  }
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void*) {
  attr->sharedSizeBytes = kStaticSmemGuess;
  return cudaSuccess;
}
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) + kStaticSmemGuess > static_cast<size_t>(g_device.optin_smem))
    return g_last_error = cudaErrorInvalidValue;
  g_max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg) {
  ++g_launches;
  g_fault.clear();
  g_last_launch = {grid.x, grid.y, block.x, smem};
  if (!check_launch_config(kernel, grid, block, smem)) return;
  while (g_stacks.size() < block.x) g_stacks.emplace_back(new char[kStackBytes]);
  std::vector<size_t> order(block.x);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (g_device.schedule == 1) std::reverse(order.begin(), order.end());
  std::mt19937 rng(g_device.seed);
  Block b;
  b.body = body;
  b.arg = arg;
  b.warps.resize(block.x / 32);
  Block* outer = g_block;
  g_block = &b;
  for (unsigned by = 0; by < grid.y && !b.failed; ++by)
    for (unsigned bx = 0; bx < grid.x && !b.failed; ++bx) {
      b.fibers.assign(block.x, Fiber{});
      for (unsigned t = 0; t < block.x; ++t) b.fibers[t].ids = {dim3(t), dim3(bx, by), block, grid};
      b.smem.assign(smem, 0xA5);  // never zero: a read of shared memory nothing wrote shows
      for (auto [p, bytes] : g_block_shared) std::memset(p, 0xA5, bytes);
      if (g_device.schedule == 2) std::shuffle(order.begin(), order.end(), rng);
      run_block(b, order, g_device.lockstep != 0);
    }
  g_block = outer;
  if (b.failed) {
    std::fprintf(stderr, "sq_cuda_emu: launch failed: %s\n", g_fault.c_str());
    g_last_error = cudaErrorLaunchFailure;
  }
}

}  // namespace sq_emu

cudaError_t cudaGetLastError() {
  cudaError_t e = sq_emu::g_last_error;
  sq_emu::g_last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    default: return sq_emu::g_fault.empty() ? "unspecified launch failure" : sq_emu::g_fault.c_str();
  }
}
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const auto& d = sq_emu::g_device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.optin_smem; break;
    default: return sq_emu::g_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// ---- test controls (ctypes) ----------------------------------------------------------------------------
// The device's opt-in shared memory and SM count are read once by the kernels' host code (cached), so set
// them before the first launch; the schedule and the cp.async timing may change between calls.
extern "C" __attribute__((visibility("default"))) void sq_emu_configure(int optin_smem, int sm_count) {
  sq_emu::g_device.optin_smem = optin_smem;
  sq_emu::g_device.sm_count = sm_count;
}
extern "C" __attribute__((visibility("default"))) void sq_emu_schedule(int order, int lockstep, int cp_async_late,
                                                                      unsigned seed) {
  sq_emu::g_device.schedule = order;
  sq_emu::g_device.lockstep = lockstep;
  sq_emu::g_device.cp_async_late = cp_async_late;
  sq_emu::g_device.seed = seed;
}
extern "C" __attribute__((visibility("default"))) long sq_emu_launches() { return sq_emu::g_launches; }
// The last launch's grid.x, grid.y, threads per block and dynamic shared memory.
extern "C" __attribute__((visibility("default"))) void sq_emu_last_launch(unsigned* gx, unsigned* gy, unsigned* threads,
                                                                         unsigned long* smem) {
  *gx = sq_emu::g_last_launch.grid_x, *gy = sq_emu::g_last_launch.grid_y;
  *threads = sq_emu::g_last_launch.block, *smem = sq_emu::g_last_launch.smem;
}
extern "C" __attribute__((visibility("default"))) const char* sq_emu_last_fault() { return sq_emu::g_fault.c_str(); }
