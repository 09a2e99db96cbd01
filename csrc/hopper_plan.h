// Which calls the Hopper kernels (CUTLASS 3 sm90 implicit GEMM: TMA im2col loads, wgmma,
// warp-specialised cooperative schedule; csrc/hopper_*.cu) serve: one pure function, shared by
// the launchers (conv_fprop.cpp, conv_backward.cpp) and, through resconv._C, the CPU tests.
//
// The rules are CUTLASS's own limits for these kernels (its can_implement, for 2-D convs:
// TMA im2col corners in [-128, 127], padding <= 255, filter offsets (R-1)*dil < 255, 16-byte
// aligned channel strides, groups == 1, 32-bit row counts, unit-stride dgrad) plus ours:
// fp16 / bf16 only (the instantiated set), channels-last outputs (the epilogue stores K- or
// C-contiguous rows with TMA), and dgrad/wgrad on a materialised dy (no fused prologue).
// Everything else is served by the hand-written kernels. The launcher still asks CUTLASS
// (can_implement) before a launch and falls back if it refuses.
//
// Plain C++: compiled by the host compiler for the launchers and for resconv._C.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RESCONV_PLAN_HD __host__ __device__ __forceinline__
#else
#define RESCONV_PLAN_HD inline
#endif

namespace resconv {

enum class HopperOp : int { Fprop = 0, Dgrad = 1, Wgrad = 2 };

// One conv call as the Hopper plan sees it. Sizes of the forward conv: x [N, C, H, W], filter
// [K, C/groups, R, S], out [N, K, P, Q]; padding (top, bottom, left, right).
struct HopperCall {
  HopperOp op;
  int dtype;           // DType as int: 0 fp16, 1 bf16, 2 fp32, 3 fp64
  bool tf32;           // fp32 only: TF32 tensor cores allowed
  int64_t N, C, H, W, K, R, S, P, Q, groups;
  int64_t stride_h, stride_w, pad_t, pad_b, pad_l, pad_r, dil_h, dil_w;
  bool out_channels_last;  // fprop: out; dgrad: dx (wgrad: ignored, dW is small)
  bool prologue;           // dgrad/wgrad: dy is formed by the fused dReLU/dBN prologue
  bool stats_with_epilogue;  // fprop statistics together with a scale, residual or ReLU
  int cc_major, cc_minor;  // the device's compute capability
  int64_t sm_count;        // its multiprocessors (wgrad: the output must fill a wave of CTAs)
  bool compiled;           // this build holds the sm_90a kernels
  bool enabled;            // the switch (RESCONV_CUDA_HOPPER, resconv.ops.cuda_extension)
};

// Channels fprop reads after the stem padding (C/groups zero-padded to a multiple of 8 when
// groups == 1 and C is not one already: the RGB stem).
RESCONV_PLAN_HD int64_t hopper_padded_channels(const HopperCall& c) {
  return (c.op == HopperOp::Fprop && c.groups == 1) ? (c.C + 7) / 8 * 8 : c.C;
}

// nullptr when the Hopper kernels serve the call, else the reason they do not (a static string).
RESCONV_PLAN_HD const char* hopper_unsupported(const HopperCall& c) {
  if (!c.enabled) return "switched off (RESCONV_CUDA_HOPPER=1 switches it on)";
  if (!c.compiled) return "this build has no sm_90a kernels (TORCH_CUDA_ARCH_LIST lacks 9.0a)";
  if (c.cc_major != 9 || c.cc_minor != 0) return "needs a GPU of compute capability 9.0 (sm_90a)";
  if (c.dtype != 0 && c.dtype != 1) return "dtype: float16 and bfloat16 only";
  if (c.groups != 1) return "groups > 1";
  if (hopper_padded_channels(c) % 8 != 0 || c.K % 8 != 0) return "C and K must be multiples of 8 (16-byte rows)";
  if (c.op != HopperOp::Wgrad && !c.out_channels_last) return "the output is not channels-last";
  if (c.op != HopperOp::Fprop && c.prologue) return "a fused dReLU/dBN prologue (dgrad/wgrad read a materialised dy)";
  if (c.stats_with_epilogue) return "statistics with a scale, residual or ReLU (the training path stores y = conv + bias)";
  if (c.op == HopperOp::Dgrad && (c.stride_h != 1 || c.stride_w != 1)) return "dgrad with stride > 1";
  if (c.stride_h > 8 || c.stride_w > 8) return "stride > 8 (TMA im2col traversal strides are 1..8)";
  // wgrad: one CTA per 128 x 64 tile of dW (K x C, per tap) over the whole N*P*Q reduction (no
  // split-K for conv in CUTLASS 4.2's sm90 kernels): fewer tiles than SMs leave most idle,
  // where the hand-written kernel splits N*P*Q.
  if (c.op == HopperOp::Wgrad && (c.K + 127) / 128 * ((c.C + 63) / 64) * c.R * c.S < c.sm_count)
    return "wgrad with fewer dW tiles than SMs (the hand-written kernel splits N*P*Q)";
  // TMA im2col (2 spatial dims): padding in [0, 255], filter offsets (R-1)*dil in [0, 254],
  // the box corners in [-128, 127].
  const int64_t pads[4] = {c.pad_t, c.pad_b, c.pad_l, c.pad_r};
  for (int i = 0; i < 4; ++i)
    if (pads[i] > 255) return "padding > 255";
  const int64_t off_h = (c.R - 1) * c.dil_h, off_w = (c.S - 1) * c.dil_w;
  if (off_h > 254 || off_w > 254) return "(R - 1) * dilation > 254";
  int64_t lo_h, lo_w, hi_h, hi_w;
  if (c.op == HopperOp::Dgrad) {
    lo_h = c.pad_t - off_h;
    lo_w = c.pad_l - off_w;
    hi_h = lo_h + c.H - c.P;
    hi_w = lo_w + c.W - c.Q;
  } else {
    lo_h = -c.pad_t;
    lo_w = -c.pad_l;
    hi_h = c.pad_b - off_h;
    hi_w = c.pad_r - off_w;
  }
  if (lo_h < -128 || lo_h > 127 || lo_w < -128 || lo_w > 127 || hi_h < -128 || hi_h > 127 || hi_w < -128 || hi_w > 127)
    return "TMA im2col corner out of [-128, 127]";
  const int64_t kMax32 = (int64_t(1) << 31) - 1;
  if (c.N * c.P * c.Q > kMax32 || c.N * c.H * c.W > kMax32) return "more than 2^31 - 1 rows";
  if (c.H > kMax32 || c.W > kMax32 || c.N > kMax32) return "sizes of 2^31 or more";
  return nullptr;
}

}  // namespace resconv
