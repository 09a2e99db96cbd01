// Op schemas (namespace resconv, names prefixed cuda_) and their kernels.
//
// The Triton ops of the Python package are torch.library fragments of the same namespace;
// the dispatcher accepts one TORCH_LIBRARY definition block per namespace beside any number
// of fragments, in either load order (checked), so this is the only TORCH_LIBRARY(resconv).
// Fake (meta) implementations and autograd are registered from Python (resconv/ops/cuda.py).
//
// The same kernels are registered for CPU: there they check every argument and then raise
// "expected a CUDA tensor", so that a wrong call fails with a message naming the argument
// rather than a dispatcher error.
#include "ops.h"

#include <torch/library.h>

TORCH_LIBRARY(resconv, m) {
  // torch imports this module when it needs a fake implementation that is not registered yet.
  m.set_python_module("resconv.ops.cuda");
  m.def(
      "cuda_conv2d_fprop(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, bool relu, bool allow_tf32, bool channels_last) -> Tensor");
  m.def(
      "cuda_conv2d_fprop_stats(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups, bool relu, bool allow_tf32, bool channels_last) "
      "-> (Tensor out, Tensor count, Tensor mean, Tensor m2)");
  m.def(
      "cuda_conv2d_bn_train(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? residual, int[2] stride, int[4] padding, int[2] dilation, int groups, float eps, bool relu, "
      "bool allow_tf32, bool channels_last) -> (Tensor out, Tensor y, Tensor mean, Tensor invstd, "
      "Tensor var_unbiased)");
  m.def(
      "cuda_bn_finalize(Tensor count, Tensor mean, Tensor m2, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor mean, Tensor invstd, Tensor var_unbiased, Tensor a, Tensor b)");
  m.def(
      "cuda_bn_update_running_stats_(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, "
      "Tensor var_unbiased, float momentum) -> ()");
  m.def("cuda_scale_shift_act(Tensor y, Tensor? a, Tensor? b, Tensor? residual, bool relu) -> Tensor");
  m.def("cuda_add_relu(Tensor x, Tensor residual, bool relu) -> Tensor");
  m.def(
      "cuda_bn_backward_reduce(Tensor grad_out, Tensor? out, Tensor? y, Tensor? mean, bool relu) -> "
      "(Tensor sum_g, Tensor sum_gy)");
  m.def(
      "cuda_bn_backward_dy(Tensor grad_out, Tensor? out, Tensor? y, Tensor a, Tensor? b, Tensor? c, Tensor? mean, "
      "bool relu, bool want_grad_residual, ScalarType dy_dtype) -> (Tensor dy, Tensor grad_residual)");
  m.def(
      "cuda_conv2d_dgrad(Tensor grad, Tensor weight, Tensor? relu_out, Tensor? y, Tensor? a, Tensor? b, Tensor? c, "
      "Tensor? mean, int[4] input_size, int[2] stride, int[4] padding, int[2] dilation, int groups, "
      "bool channels_last, bool allow_tf32) -> Tensor");
  m.def(
      "cuda_conv2d_wgrad(Tensor grad, Tensor x, Tensor? relu_out, Tensor? y, Tensor? a, Tensor? b, Tensor? c, "
      "Tensor? mean, int[4] weight_size, int[2] stride, int[4] padding, int[2] dilation, int groups, "
      "bool need_bias, bool weight_channels_last, bool allow_tf32, int split_k=0) -> (Tensor grad_weight, "
      "Tensor grad_bias)");
}

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
}
}  // namespace

TORCH_LIBRARY_IMPL(resconv, CUDA, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(resconv, CPU, m) { register_kernels(m); }
