// Host-side glue between the ATen launchers and the Hopper kernels (hopper.h): the device facts
// the plan needs, and a launch with its workspace allocated by PyTorch's caching allocator.
#pragma once

#include "common.h"
#include "hopper.h"

namespace resconv {

// The forward conv's sizes: x [N, C, H, W], filter [K, C/groups, R, S], out [N, K, P, Q].
struct ConvSizes {
  int64_t N, C, H, W, K, R, S, P, Q;
};

// A HopperCall for `op` on tensors like `t` (dtype, device) and a conv of these sizes and
// arguments (padding: top, bottom, left, right), with the device facts (compute capability,
// multiprocessors), whether this build has the kernels and the switch; the op-specific flags
// (output layout, prologue, statistics) are the caller's.
HopperCall hopper_call(HopperOp op, const Tensor& t, bool tf32, const ConvSizes& sizes, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// Asks CUTLASS, allocates the workspace and launches `conv` on the current stream. true when it
// ran; false when CUTLASS declined a call the plan accepted (nothing launched: the caller falls
// back to the hand-written kernels, after a one-time warning; a forced `hopper` raises
// ValueError naming `op` instead).
bool hopper_launch(const char* op, const HopperConv& conv, const Tensor& like, ForcedKernel forced);

// Whether the caller takes the Hopper path: the plan's verdict `why` (nullptr: serve) under the
// forced-kernel test switch. A forced `hopper` the plan refuses raises ValueError naming `op`
// and the reason; a forced hand-written kernel declines.
bool take_hopper_path(const char* op, const char* why, ForcedKernel forced);

}  // namespace resconv
