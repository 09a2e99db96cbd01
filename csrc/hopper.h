// The Hopper kernels (CUTLASS 3 sm90 implicit GEMM, compiled for sm_90a only: csrc/hopper_*.cu)
// as the host launchers see them: plain C++, raw pointers and sizes (like kernels.h). Which
// calls they serve is hopper_plan.h's decision; a launcher that takes this path passes dense
// channels-last (NHWC) operands with 16-byte aligned bases, as the plan's rules require.
//
// Without 9.0a in TORCH_CUDA_ARCH_LIST these files compile to stubs: hopper_compiled() is false
// and every entry point returns "not compiled".
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "hopper_plan.h"
#include "types.h"

namespace resconv {

// The operands of one Hopper conv. Shapes are the forward conv's (hopper_plan.h: HopperCall).
//   fprop: a = x [N, H, W, C] (C padded: HopperCall::C is the padded count), b = filter
//          [K, R, S, C], d = out [N, P, Q, K] with strides (d_sn, d_sh, d_sw) and channel
//          stride 1; residual: d's shape and strides, or nullptr; scale/shift [K] fp32 or
//          nullptr; with stats: y = acc + shift is stored and its statistics partials written.
//   dgrad: a = dy [N, P, Q, K], b = filter [K, R, S, C], d = dx [N, H, W, C] with strides
//          (d_sn, d_sh, d_sw), channel stride 1.
//   wgrad: a = dy [N, P, Q, K], b = x [N, H, W, C], d = dW [K, R, S, C] dense.
struct HopperConv {
  HopperCall call;
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  int64_t d_sn = 0, d_sh = 0, d_sw = 0;
  const void* residual = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  bool relu = false;
  float* stat_count = nullptr;  // [T]       with stats (fprop): T = ceil(N*P*Q / kStatsTileRows)
  float* stat_mean = nullptr;   // [T, K]
  float* stat_m2 = nullptr;     // [T, K]
  int sm_count = 0;             // the device's multiprocessors (persistent grid)
};

// Whether this build holds the sm_90a kernels.
bool hopper_compiled();

// The switch (off by default; resconv.ops.cuda_extension sets it from RESCONV_CUDA_HOPPER when
// it loads the extension): whether the launchers consider the Hopper kernels at all.
bool hopper_switch();
void set_hopper_switch(bool on);

// Bytes of device workspace `conv` needs (*bytes), or why the kernel cannot run it (CUTLASS's
// can_implement refused: a static string; nullptr when it can).
const char* hopper_workspace(const HopperConv& conv, size_t* bytes);

// Runs `conv` on `stream` with `workspace` (hopper_workspace's size, may be nullptr when 0).
// Returns nullptr on success, else why nothing was launched.
const char* hopper_run(const HopperConv& conv, void* workspace, cudaStream_t stream);

namespace hopper_impl {
// One entry per (op, dtype) translation unit: with bytes != nullptr, the workspace query;
// else the launch. Same return convention as hopper_run.
const char* fprop_f16(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream);
const char* fprop_bf16(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream);
const char* dgrad(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream);
const char* wgrad(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream);
}  // namespace hopper_impl

}  // namespace resconv
