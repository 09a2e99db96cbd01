// Hopper fprop, float16: the three epilogue variants of hopper_conv.cuh (eval, eval + residual,
// training statistics). CUTLASS code is compiled only for the host and the sm_90a device
// pass (other architectures' device passes see nothing of it), and only when the build asks for
// sm_90a (RESCONV_SM90A, set by resconv/build.py for 9.0a in TORCH_CUDA_ARCH_LIST); without it,
// stubs that say so.
// CUTLASS's device-side asserts call __assertfail, and a call inside the kernel serialises the
// wgmma pipeline (ptxas C7510): compiled out in this translation unit (it includes no torch code).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "hopper.h"

#if defined(RESCONV_SM90A) && (!defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
#include "hopper_conv.cuh"

namespace resconv {
bool hopper_compiled() { return true; }
namespace hopper_impl {
const char* fprop_f16(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream) {
  return hopper::fprop<cutlass::half_t>(conv, bytes, workspace, stream);
}
}  // namespace hopper_impl
}  // namespace resconv
#elif !defined(RESCONV_SM90A)
namespace resconv {
bool hopper_compiled() { return false; }
namespace hopper_impl {
const char* fprop_f16(const HopperConv&, size_t*, void*, cudaStream_t) { return "this build has no sm_90a kernels"; }
}  // namespace hopper_impl
}  // namespace resconv
#endif
