// Hopper wgrad, float16 and bfloat16 (hopper_conv.cuh), on a materialised dy. Compiled into
// CUTLASS code only for the host and the sm_90a device pass, and only with RESCONV_SM90A.
// CUTLASS's device-side asserts call __assertfail, and a call inside the kernel serialises the
// wgmma pipeline (ptxas C7510): compiled out in this translation unit (it includes no torch code).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "hopper.h"

#if defined(RESCONV_SM90A) && (!defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
#include "hopper_conv.cuh"

namespace resconv::hopper_impl {
const char* wgrad(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream) {
  if (conv.call.dtype == static_cast<int>(DType::Half))
    return hopper::plain<hopper::Wgrad<cutlass::half_t>>(conv, bytes, workspace, stream);
  return hopper::plain<hopper::Wgrad<cutlass::bfloat16_t>>(conv, bytes, workspace, stream);
}
}  // namespace resconv::hopper_impl
#elif !defined(RESCONV_SM90A)
namespace resconv::hopper_impl {
const char* wgrad(const HopperConv&, size_t*, void*, cudaStream_t) { return "this build has no sm_90a kernels"; }
}  // namespace resconv::hopper_impl
#endif
