#include "hopper_host.h"

#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAException.h>

namespace resconv {

HopperCall hopper_call(HopperOp op, const Tensor& t, bool tf32, const ConvSizes& z, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  HopperCall c{};
  c.op = op;
  c.dtype = static_cast<int>(to_dtype(t.scalar_type()));
  c.tf32 = tf32;
  c.N = z.N, c.C = z.C, c.H = z.H, c.W = z.W, c.K = z.K, c.R = z.R, c.S = z.S, c.P = z.P, c.Q = z.Q;
  c.groups = groups;
  c.stride_h = stride[0], c.stride_w = stride[1], c.dil_h = dilation[0], c.dil_w = dilation[1];
  c.pad_t = padding[0], c.pad_b = padding[1], c.pad_l = padding[2], c.pad_r = padding[3];
  c.compiled = hopper_compiled();
  c.enabled = hopper_switch();
  if (c.enabled && c.compiled && t.is_cuda()) {  // no device query otherwise
    const auto* props = at::cuda::getDeviceProperties(t.device().index());
    c.cc_major = props->major;
    c.cc_minor = props->minor;
    c.sm_count = props->multiProcessorCount;
  }
  return c;
}

static const char* launch(const HopperConv& conv, const Tensor& like) {
  size_t bytes = 0;
  if (const char* why = hopper_workspace(conv, &bytes)) return why;
  const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  const char* why = hopper_run(conv, bytes > 0 ? workspace.data_ptr() : nullptr,
                               c10::cuda::getCurrentCUDAStream(like.device().index()));
  if (why == nullptr) C10_CUDA_KERNEL_LAUNCH_CHECK();
  return why;
}

bool hopper_launch(const char* op, const HopperConv& conv, const Tensor& like, ForcedKernel forced) {
  const char* why = launch(conv, like);
  if (why == nullptr) return true;
  TORCH_CHECK_VALUE(forced != ForcedKernel::Hopper, op, ": RESCONV_CUDA_CONV_KERNEL=hopper: ", why);
  TORCH_WARN_ONCE(op, ": the Hopper kernel declined a call its plan accepted (", why,
                  "); the hand-written kernels serve it");
  return false;
}

bool take_hopper_path(const char* op, const char* why, ForcedKernel forced) {
  if (forced == ForcedKernel::Hopper)
    TORCH_CHECK_VALUE(why == nullptr, op, ": RESCONV_CUDA_CONV_KERNEL=hopper: the Hopper kernels cannot serve this call (",
                      why, ")");
  return why == nullptr && (forced == ForcedKernel::Auto || forced == ForcedKernel::Hopper);
}

}  // namespace resconv
