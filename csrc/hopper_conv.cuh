// The Hopper conv kernels: CUTLASS 3 sm90 implicit-GEMM collectives (TMA im2col operand loads,
// wgmma, warp-specialised: one producer warpgroup issuing TMA, one consumer warpgroup issuing
// wgmma and running the epilogue; CUTLASS 4.2 has no persistent or cooperative schedule for
// conv yet) with resconv's epilogue visitor trees, and the host runner that turns a HopperConv
// into CUTLASS arguments. Included by the csrc/hopper_*.cu translation units
// only in their sm_90a device pass and their host pass (see the guard there).
//
// The instantiated set is small on purpose (build time): per 16-bit dtype, fprop in three
// epilogue variants (eval; eval + residual; training statistics), dgrad and wgrad; one tile
// shape each.
#pragma once

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>  // before the conv headers, which use cute without including it
#include <cute/atom/mma_atom.hpp>
#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "hopper.h"
#include "hopper_epilogue.cuh"

namespace resconv::hopper {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
using Round = cutlass::FloatRoundStyle;
constexpr Round kRound = Round::round_to_nearest;

// fprop / dgrad: 128 (output pixels) x 128 (channels) x 64 (reduction) per CTA; an epilogue
// subtile of 64 x 32 (the non-cooperative epilogue's M) is one whole kStatsTileRows segment.
using TileShape = Shape<_128, _128, Shape<_64>>;
using ClusterShape = Shape<_1, _1, _1>;
using EpilogueTile = Shape<_64, _32>;
constexpr int kEpilogueThreads = 128;  // the consumer warpgroup
// wgrad: 128 output channels x 64 input channels of one (r, s) tap x 64 output pixels.
using WgradTileShape = Shape<_128, Shape<_64>, Shape<_64>>;

using MainloopSchedule = cutlass::conv::KernelImplicitTmaWarpSpecializedSm90;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
using Nhwc = cutlass::layout::TensorNHWC;

// ---- epilogue visitor trees (fp32 math, one rounding to the output dtype) -----------------
using ChannelVector = fusion::Sm90RowBroadcast<0, TileShape, float, float>;  // [K], nullptr: its null_default
// acc * scale[k] + shift[k]
using Affine = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, float, float, kRound>,
                               fusion::Sm90AccFetch, ChannelVector, ChannelVector>;
// relu?(acc * scale + shift)
template <class T>
using EvalEvt = fusion::Sm90EVT<fusion::Sm90Compute<ReluIf, T, float, kRound>, Affine>;
// relu?(acc * scale + shift + residual), the residual read as the epilogue's source C
template <class T>
using EvalResidualEvt = fusion::Sm90EVT<
    fusion::Sm90Compute<ReluIf, T, float, kRound>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>, Affine, fusion::Sm90SrcFetch<T>>>;
// y = acc + shift, stored, with its statistics partials
using StatsNode = Sm90BnPartialStats<size<0>(EpilogueTile{}), size<1>(EpilogueTile{}), kEpilogueThreads, kStatsTileRows>;
using StatsEvt = fusion::Sm90EVT<
    StatsNode, fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>, fusion::Sm90AccFetch,
                               ChannelVector>>;

// ---- kernels ---------------------------------------------------------------------------
template <cutlass::conv::Operator Op, class Element, class ElementC, class ElementD, class Fusion, class Tile,
          class EpiSchedule, class EpiTile, class LayoutD, class Scheduler = void>
struct Conv {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape, EpiTile, float, float, ElementC, LayoutD,
      16 / sizeof(ElementD), ElementD, LayoutD, 16 / sizeof(ElementD), EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Op, Element, Nhwc, 16 / sizeof(Element), Element, Nhwc,
      16 / sizeof(Element), float, Tile, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<Op, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue, Scheduler>;
  using Device = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <class T, class Fusion, class ElementC = void>
using Fprop = Conv<cutlass::conv::Operator::kFprop, T, ElementC, T, Fusion, TileShape, EpilogueSchedule, EpilogueTile,
                   Nhwc>;
template <class T>
using Dgrad = Conv<cutlass::conv::Operator::kDgrad, T, void, T, fusion::LinearCombination<T, float, void, float>,
                   TileShape, EpilogueSchedule, EpilogueTile, Nhwc>;
// dW [K, R, S, C]: one CTA per output tile over the whole N*P*Q reduction (no split-K for conv
// in CUTLASS 4.2's sm90 kernels), so the plan sends only outputs of at least a wave of tiles here.
template <class T>
using Wgrad = Conv<cutlass::conv::Operator::kWgrad, T, void, T, fusion::LinearCombination<T, float, void, float>,
                   WgradTileShape, cutlass::epilogue::NoSmemWarpSpecialized,
                   cutlass::epilogue::collective::EpilogueTileAuto, cutlass::layout::TensorKCSR>;

// ---- host runner -----------------------------------------------------------------------
template <class Problem>
Problem make_problem(const HopperCall& c) {
  const int N = int(c.N), H = int(c.H), W = int(c.W), C = int(c.C), K = int(c.K), R = int(c.R), S = int(c.S);
  return Problem(cutlass::conv::Mode::kCrossCorrelation, {N, H, W, C},
                 {int64_t(H) * W * C, int64_t(W) * C, int64_t(C), int64_t(1)}, {K, R, S, C},
                 {int64_t(R) * S * C, int64_t(S) * C, int64_t(C), int64_t(1)}, {int(c.pad_t), int(c.pad_l)},
                 {int(c.pad_b), int(c.pad_r)}, {int(c.stride_h), int(c.stride_w)}, {int(c.dil_h), int(c.dil_w)}, 1);
}

// The output strides of fprop / dgrad: the GEMM row mode is (q, p, n) (w, h, n for dgrad),
// the channel stride 1.
template <class Stride>
Stride row_strides(const HopperConv& c) {
  Stride s{};
  get<0, 0>(s) = c.d_sw;
  get<0, 1>(s) = c.d_sh;
  get<0, 2>(s) = c.d_sn;
  return s;
}

// can_implement, then the workspace query (bytes != nullptr) or initialize + launch.
template <class Device>
const char* run_device(typename Device::Arguments const& args, size_t* bytes, void* workspace, cudaStream_t stream) {
  if (Device::can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this problem";
  if (bytes != nullptr) {
    *bytes = Device::get_workspace_size(args);
    return nullptr;
  }
  Device op;
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (op.run(stream) != cutlass::Status::kSuccess) return "CUTLASS launch failed";
  return nullptr;
}

inline cutlass::KernelHardwareInfo hardware(const HopperConv& c) {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = c.sm_count;
  return hw;
}

template <class Cfg>
typename Cfg::Device::Arguments base_arguments(const HopperConv& c, const void* ptr_c) {
  using Kernel = typename Cfg::Kernel;
  using ElementA = typename Kernel::ElementA;
  using ElementB = typename Kernel::ElementB;
  using ElementD = typename Kernel::ElementD;
  typename Cfg::Device::Arguments args{};
  args.problem_shape = make_problem<typename Cfg::Problem>(c.call);
  args.mainloop.ptr_A = static_cast<const ElementA*>(c.a);
  args.mainloop.ptr_B = static_cast<const ElementB*>(c.b);
  args.epilogue.ptr_D = static_cast<ElementD*>(c.d);
  args.hw_info = hardware(c);
  if constexpr (Cfg::Problem::ConvOp == cutlass::conv::Operator::kWgrad) {
    const auto& p = args.problem_shape;
    args.epilogue.dD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, p.shape_C, p.stride_C,
                                                        cutlass::conv::Operator::kWgrad);
  } else {
    args.epilogue.dD = row_strides<typename Kernel::StrideD>(c);
    if constexpr (!cute::is_void_v<typename Kernel::ElementC>) {
      args.epilogue.ptr_C = static_cast<const typename Kernel::ElementC*>(ptr_c);
      args.epilogue.dC = row_strides<typename Kernel::StrideC>(c);
    }
  }
  return args;
}

// fprop in its three epilogue variants.
template <class T>
const char* fprop(const HopperConv& c, size_t* bytes, void* workspace, cudaStream_t stream) {
  const typename ChannelVector::Arguments scale{c.scale, 1.f, {}}, shift{c.shift, 0.f, {}};
  const typename Affine::Arguments affine{{}, scale, shift, {}};
  if (c.stat_mean != nullptr) {
    using Cfg = Fprop<T, StatsEvt>;
    auto args = base_arguments<Cfg>(c, nullptr);
    args.epilogue.thread = {{{}, shift, {}}, {c.stat_mean, c.stat_m2, c.stat_count, c.call.K}};
    return run_device<typename Cfg::Device>(args, bytes, workspace, stream);
  }
  if (c.residual != nullptr) {
    using Cfg = Fprop<T, EvalResidualEvt<T>, T>;
    auto args = base_arguments<Cfg>(c, c.residual);
    args.epilogue.thread = {{affine, {}, {}}, {c.relu}};
    return run_device<typename Cfg::Device>(args, bytes, workspace, stream);
  }
  using Cfg = Fprop<T, EvalEvt<T>>;
  auto args = base_arguments<Cfg>(c, nullptr);
  args.epilogue.thread = {affine, {c.relu}};
  return run_device<typename Cfg::Device>(args, bytes, workspace, stream);
}

template <class Cfg>
const char* plain(const HopperConv& c, size_t* bytes, void* workspace, cudaStream_t stream) {
  auto args = base_arguments<Cfg>(c, nullptr);
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  return run_device<typename Cfg::Device>(args, bytes, workspace, stream);
}

}  // namespace resconv::hopper
