// The kernels of the cuda_* ops (namespace resconv). The extension registers kernels only:
// the schemas, fake (meta) implementations and autograd are registered in Python
// (resconv/ops/cuda.py, SCHEMAS) when resconv is imported, so that the ops exist and trace
// without the extension. Loading it checks each kernel's signature against its schema.
//
// The same kernels are registered for CPU: there they check every argument and then raise
// "expected a CUDA tensor", so that a wrong call fails with a message naming the argument
// rather than a dispatcher error.
#include "filter_cache.h"
#include "ops.h"

#include <torch/library.h>

namespace {
void register_kernels(torch::Library& m) {
  m.impl("cuda_conv2d_fprop", &resconv::conv2d_fprop);
  m.impl("cuda_conv2d_fprop_stats", &resconv::conv2d_fprop_stats);
  m.impl("cuda_conv2d_bn_train", &resconv::conv2d_bn_train);
  m.impl("cuda_bn_finalize", &resconv::bn_finalize);
  m.impl("cuda_bn_update_running_stats_", &resconv::bn_update_running_stats_);
  m.impl("cuda_scale_shift_act", &resconv::scale_shift_act);
  m.impl("cuda_add_relu", &resconv::add_relu);
  m.impl("cuda_bn_backward_reduce", &resconv::bn_backward_reduce);
  m.impl("cuda_bn_backward_dy", &resconv::bn_backward_dy);
  m.impl("cuda_conv2d_dgrad", &resconv::conv2d_dgrad);
  m.impl("cuda_conv2d_wgrad", &resconv::conv2d_wgrad);
  m.impl("cuda_packed_filter", &resconv::packed_filter_op);
}
}  // namespace

TORCH_LIBRARY_IMPL(resconv, CUDA, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(resconv, CPU, m) { register_kernels(m); }
