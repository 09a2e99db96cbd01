// The Hopper kernels' host entry points (hopper.h): the switch and the dispatch to the
// per-(op, dtype) translation units.
#include <atomic>

#include "hopper.h"

namespace resconv {
namespace {
std::atomic<bool> g_hopper_switch{false};
}  // namespace

bool hopper_switch() { return g_hopper_switch.load(); }
void set_hopper_switch(bool on) { g_hopper_switch.store(on); }

static const char* dispatch(const HopperConv& conv, size_t* bytes, void* workspace, cudaStream_t stream) {
  if (!hopper_compiled()) return "this build has no sm_90a kernels";
  const bool half = conv.call.dtype == static_cast<int>(DType::Half);
  const bool bf16 = conv.call.dtype == static_cast<int>(DType::BFloat16);
  if (!half && !bf16) return "dtype: float16 and bfloat16 only";
  switch (conv.call.op) {
    case HopperOp::Fprop:
      return half ? hopper_impl::fprop_f16(conv, bytes, workspace, stream)
                  : hopper_impl::fprop_bf16(conv, bytes, workspace, stream);
    case HopperOp::Dgrad:
      return hopper_impl::dgrad(conv, bytes, workspace, stream);
    case HopperOp::Wgrad:
      return hopper_impl::wgrad(conv, bytes, workspace, stream);
  }
  return "unknown op";
}

const char* hopper_workspace(const HopperConv& conv, size_t* bytes) {
  *bytes = 0;
  return dispatch(conv, bytes, nullptr, nullptr);
}

const char* hopper_run(const HopperConv& conv, void* workspace, cudaStream_t stream) {
  return dispatch(conv, nullptr, workspace, stream);
}

}  // namespace resconv
