// Hopper int8 GEMM (sm_90a, fp16 out) through CUTLASS 3: TMA loads, a warp-specialized wgmma s8 mainloop, and
// the dequantizing epilogue of cuda_kernels.cu written as an epilogue visitor tree with the same operation order,
// y = T(float(acc) * (x_scale[m] * w_scale[n]) + bias[n]) (no fused multiply-add), so it can be tested bit for
// bit against the same reference. Compiled only for sm_90a (wgmma does not exist elsewhere); see cuda_gemm_sm90.h.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_gemm_sm90.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace sq {
namespace cuda {
namespace sm90_detail {

// Float multiply and add, each rounded on its own. cutlass::multiplies and cutlass::plus are a plain a * b and
// a + b, which nvcc contracts into one fma across the tree (fma.rn.f32 in the PTX, one rounding fewer); the
// mma.sync kernel and the CPU reference round the product and the sum separately. Device code only.
struct RoundedMul {
  CUTLASS_HOST_DEVICE float operator()(float a, float b) const {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
};
struct RoundedAdd {
  CUTLASS_HOST_DEVICE float operator()(float a, float b) const {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
};
// The functor shape Sm90Compute takes: Fn<float> and Fn<Array<float, N>>, applied element by element.
template <class Op, class T>
struct Elementwise {
  CUTLASS_HOST_DEVICE T operator()(T const& a, T const& b) const { return Op{}(a, b); }
};
template <class Op, int N>
struct Elementwise<Op, cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                          cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = Op{}(a[i], b[i]);
    return out;
  }
};
}  // namespace sm90_detail

namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRN = cutlass::FloatRoundStyle::round_to_nearest;

template <class T>
using MulRn = sm90_detail::Elementwise<sm90_detail::RoundedMul, T>;
template <class T>
using AddRn = sm90_detail::Elementwise<sm90_detail::RoundedAdd, T>;

// plus(multiplies(acc, multiplies(x_scale[m], w_scale[n])), bias[n]); a null bias reads as 0.
template <typename T, class Tile>
using DequantTree = fusion::Sm90EVT<
    fusion::Sm90Compute<AddRn, T, float, kRN>,
    fusion::Sm90EVT<fusion::Sm90Compute<MulRn, float, float, kRN>, fusion::Sm90AccFetch,
                    fusion::Sm90EVT<fusion::Sm90Compute<MulRn, float, float, kRN>,
                                    fusion::Sm90ColBroadcast<0, Tile, T, float>,
                                    fusion::Sm90RowBroadcast<0, Tile, T, float>>>,
    fusion::Sm90RowBroadcast<0, Tile, T, float>>;

// X [M, K] row-major and W [N, K] row-major (K-major both, what int8 wgmma takes), Y [M, N] row-major.
template <typename T, class Tile, class Cluster, class KernelSchedule, class EpilogueSchedule>
struct Int8Gemm {
  static constexpr int kAlignOut = 16 / sizeof(T);
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, kAlignOut, T,
      cutlass::layout::RowMajor, kAlignOut, EpilogueSchedule, DequantTree<T, Tile>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws,
                                              const T* bias, int m, int n, int k, T* y, int sm_count) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    typename Device::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {m, n, k, 1};
    args.mainloop.ptr_A = xq;
    args.mainloop.dA = cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1));
    args.mainloop.ptr_B = wq;
    args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1));
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, make_shape(m, n, 1));
    args.epilogue.ptr_D = y;
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));
    auto& tree = args.epilogue.thread;  // plus(mul(acc, mul(x_scale, w_scale)), bias): children, then the node
    tree.op_0.op_1.op_0 = {xs, T(0), {}};
    tree.op_0.op_1.op_1 = {ws, T(0), {}};
    tree.op_1 = {bias, T(0), {}};
    int device = 0;
    cudaGetDevice(&device);
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    return args;
  }

  // Whether CUTLASS takes the problem without a workspace (host-side checks only: no GPU needed).
  static bool accepts(const typename Device::Arguments& args) {
    return Device::can_implement(args) == cutlass::Status::kSuccess && Device::get_workspace_size(args) == 0;
  }

  // False (nothing launched) when CUTLASS cannot take the problem or would need a workspace.
  static bool run(const int8_t* xq, const T* xs, const int8_t* wq, const T* ws, const T* bias, int m, int n, int k,
                  T* y, int sm_count, cudaStream_t stream) {
    auto args = arguments(xq, xs, wq, ws, bias, m, n, k, y, sm_count);
    if (!accepts(args)) return false;
    Device gemm;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return false;
    return gemm.run(stream) == cutlass::Status::kSuccess;
  }
};

using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using WarpSpecialized = cutlass::gemm::KernelTmaWarpSpecialized;
using EpiTma = cutlass::epilogue::TmaWarpSpecialized;
using Half = cutlass::half_t;  // CUTLASS's fp16 type (same bits as __half), which its TMA and broadcast code know
// Tiles after vLLM's sm90 int8 configurations, by rows: above 128, (64, 128], up to 64 (see choose_tiles).
using LargeGemm = Int8Gemm<Half, Shape<_128, _128, _128>, Shape<_2, _1, _1>, Pingpong, EpiTma>;
using MediumGemm = Int8Gemm<Half, Shape<_64, _128, _128>, Shape<_2, _1, _1>, Pingpong, EpiTma>;
using SmallGemm = Int8Gemm<Half, Shape<_64, _64, _256>, Shape<_1, _1, _1>, WarpSpecialized, EpiTma>;

// Which of the three: by rows, except that 128-row tiles which would leave SMs idle (M = 256 at N = 4096: 64 tiles
// for 132 SMs) give way to 64-row tiles, twice as many.
enum class Tiles { kSmall, kMedium, kLarge };
Tiles choose_tiles(int64_t m, int64_t n, int sm_count) {
  if (m <= 64) return Tiles::kSmall;
  if (m <= 128) return Tiles::kMedium;
  const int64_t large = ((m + 127) / 128) * ((n + 127) / 128);
  return large < sm_count ? Tiles::kMedium : Tiles::kLarge;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
const Half* ct(const __half* p) { return reinterpret_cast<const Half*>(p); }

}  // namespace

namespace {
// Our own preconditions: TMA needs 16-byte aligned bases and row pitches; CUTLASS's problem shape is int.
bool shape_fits(int64_t m, int64_t n, int64_t k) {
  return m > 0 && n > 0 && k > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && k % 16 == 0 && n % 8 == 0;
}
}  // namespace

bool sm90_int8_matmul_dequant(const int8_t* xq, const __half* xs, const int8_t* wq, const __half* ws,
                              const __half* bias, int64_t m, int64_t n, int64_t k, __half* y, int sm_count,
                              void* stream) {
  if (!shape_fits(m, n, k)) return false;
  // The scale and bias vectors are read in 16-byte vectors too.
  if (!aligned16(xq) || !aligned16(wq) || !aligned16(y) || !aligned16(xs) || !aligned16(ws)) return false;
  if (bias && !aligned16(bias)) return false;
  auto s = static_cast<cudaStream_t>(stream);
  int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  auto out = reinterpret_cast<Half*>(y);
  switch (choose_tiles(m, n, sm_count)) {
    case Tiles::kLarge: return LargeGemm::run(xq, ct(xs), wq, ct(ws), ct(bias), mi, ni, ki, out, sm_count, s);
    case Tiles::kMedium: return MediumGemm::run(xq, ct(xs), wq, ct(ws), ct(bias), mi, ni, ki, out, sm_count, s);
    default: return SmallGemm::run(xq, ct(xs), wq, ct(ws), ct(bias), mi, ni, ki, out, sm_count, s);
  }
}

int sm90_accepts(int64_t m, int64_t n, int64_t k, int sm_count) {
  if (!shape_fits(m, n, k)) return 1;
  // Aligned stand-in addresses: only the host-side checks run, nothing is dereferenced.
  auto i8 = reinterpret_cast<const int8_t*>(uintptr_t{4096});
  auto h = reinterpret_cast<const Half*>(uintptr_t{8192});
  auto y = reinterpret_cast<Half*>(uintptr_t{16384});
  int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  bool ok = false;
  switch (choose_tiles(m, n, sm_count)) {
    case Tiles::kLarge: ok = LargeGemm::accepts(LargeGemm::arguments(i8, h, i8, h, h, mi, ni, ki, y, sm_count)); break;
    case Tiles::kMedium: ok = MediumGemm::accepts(MediumGemm::arguments(i8, h, i8, h, h, mi, ni, ki, y, sm_count)); break;
    default: ok = SmallGemm::accepts(SmallGemm::arguments(i8, h, i8, h, h, mi, ni, ki, y, sm_count)); break;
  }
  return ok ? 0 : 2;
}

}  // namespace cuda
}  // namespace sq
