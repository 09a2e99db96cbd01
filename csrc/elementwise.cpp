// Launchers of the per-channel elementwise kernels: BatchNorm apply / residual + ReLU, and the
// dReLU + residual-gradient + dBN input-gradient pass.
#include "ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace resconv {

// `fmt` is the output's layout (operands are read dense in it): y's own (memory_format_of) for
// the op, the conv output's for the training composite, where both layouts can coincide
// (P = Q = 1) and the result must carry the strides its fake implementation promises.
Tensor scale_shift_act_impl(const char* op, const Tensor& y_in, const OptTensor& a_in, const OptTensor& b_in,
                            const OptTensor& center_in, const OptTensor& residual_in, bool relu, at::MemoryFormat fmt) {
  check_dim(y_in, 4, op, "input", "[N, K, P, Q]");
  check_kernel_dtype(y_in, op, "input");
  const int64_t K = y_in.size(1);
  TORCH_CHECK_VALUE(a_in.has_value() == b_in.has_value(), op, ": a, b: expected both or neither");
  check_channel_vector(a_in, K, op, "a");
  check_channel_vector(b_in, K, op, "b");
  TORCH_CHECK_VALUE(!center_in.has_value() || a_in.has_value(), op,
                    ": center: given without a and b (out = (y - center) * a + b)");
  check_channel_vector(center_in, K, op, "center");
  if (residual_in.has_value()) {
    check_same_shape(*residual_in, y_in, op, "residual", "input");
    check_same_dtype(*residual_in, y_in, op, "residual", "input");
  }
  check_cuda(y_in, op, "input");
  check_same_device(a_in, y_in, op, "a", "input");
  check_same_device(b_in, y_in, op, "b", "input");
  check_same_device(center_in, y_in, op, "center", "input");
  check_same_device(residual_in, y_in, op, "residual", "input");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Tensor y = dense_in(y_in, fmt);
  Tensor out = new_output(y.sizes(), y.options(), fmt);
  if (y.numel() == 0) return out;
  const Tensor res = residual_in.has_value() ? dense_in(*residual_in, fmt) : Tensor();
  const Tensor a = as_float_vector(a_in), b = as_float_vector(b_in), center = as_float_vector(center_in);
  launch_scale_shift_act(y.data_ptr(), data_or_null(res), out.data_ptr(), float_ptr(a), float_ptr(b),
                         float_ptr(center), to_dtype(y.scalar_type()), y.numel(), K, y.size(2) * y.size(3),
                         fmt == at::MemoryFormat::ChannelsLast, relu, c10::cuda::getCurrentCUDAStream());
  return out;
}

Tensor scale_shift_act(const Tensor& y, const OptTensor& a, const OptTensor& b, const OptTensor& residual,
                       bool relu, const OptTensor& center) {
  return scale_shift_act_impl("resconv::cuda_scale_shift_act", y, a, b, center, residual, relu, memory_format_of(y));
}

Tensor add_relu(const Tensor& x, const Tensor& residual, bool relu) {
  return scale_shift_act_impl("resconv::cuda_add_relu", x, std::nullopt, std::nullopt, std::nullopt, residual, relu,
                              memory_format_of(x));
}

std::tuple<Tensor, Tensor> bn_backward_dy(const Tensor& grad_out_in, const OptTensor& out_in, const OptTensor& y_in,
                                          const Tensor& a_in, const OptTensor& b_in, const OptTensor& c_in,
                                          const OptTensor& mean_in, bool relu, bool want_grad_residual,
                                          at::ScalarType dy_dtype) {
  const char* op = "resconv::cuda_bn_backward_dy";
  check_dim(grad_out_in, 4, op, "grad_out", "[N, K, P, Q]");
  check_kernel_dtype(grad_out_in, op, "grad_out");
  TORCH_CHECK_VALUE(!relu || out_in.has_value(), op, ": out: required when relu=True (its sign is the ReLU mask)");
  for (const auto& [t, name] : {std::pair<const OptTensor&, const char*>{out_in, "out"}, {y_in, "y"}}) {
    if (!t.has_value()) continue;
    check_same_shape(*t, grad_out_in, op, name, "grad_out");
    check_same_dtype(*t, grad_out_in, op, name, "grad_out");
  }
  const int64_t K = grad_out_in.size(1);
  check_channel_vector(a_in, K, op, "a");
  const bool has_y = y_in.has_value();
  TORCH_CHECK_VALUE(!has_y || (b_in.has_value() && c_in.has_value() && mean_in.has_value()), op,
                    ": b, c, mean: required when y is given");
  check_channel_vector(b_in, K, op, "b");
  check_channel_vector(c_in, K, op, "c");
  check_channel_vector(mean_in, K, op, "mean");
  TORCH_CHECK_TYPE(dy_dtype == grad_out_in.scalar_type() || dy_dtype == at::kFloat, op,
                   ": dy_dtype: expected grad_out's dtype (", grad_out_in.scalar_type(), ") or float32, got ",
                   dy_dtype);
  check_cuda(grad_out_in, op, "grad_out");
  check_same_device(out_in, grad_out_in, op, "out", "grad_out");
  check_same_device(y_in, grad_out_in, op, "y", "grad_out");
  check_same_device(a_in, grad_out_in, op, "a", "grad_out");
  check_same_device(b_in, grad_out_in, op, "b", "grad_out");
  check_same_device(c_in, grad_out_in, op, "c", "grad_out");
  check_same_device(mean_in, grad_out_in, op, "mean", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  // All operands in the layout of the saved forward tensor (like the Triton launcher).
  const Tensor& like = out_in.has_value() ? *out_in : (has_y ? *y_in : grad_out_in);
  const auto fmt = memory_format_of(like);
  const Tensor grad_out = dense_in(grad_out_in, fmt);
  Tensor dy = new_output(grad_out.sizes(), grad_out.options().dtype(dy_dtype), fmt);
  Tensor gres = want_grad_residual ? new_output(grad_out.sizes(), grad_out.options(), fmt)
                                   : at::empty({0}, grad_out.options());
  if (grad_out.numel() == 0) return {dy, gres};
  const Tensor out = out_in.has_value() ? dense_in(*out_in, fmt) : Tensor();
  const Tensor y = has_y ? dense_in(*y_in, fmt) : Tensor();
  const Tensor a = as_float_vector(a_in), b = as_float_vector(b_in), c = as_float_vector(c_in),
               mean = as_float_vector(mean_in);
  launch_bn_backward_dy(grad_out.data_ptr(), relu ? out.data_ptr() : nullptr, data_or_null(y), dy.data_ptr(),
                        want_grad_residual ? gres.data_ptr() : nullptr, float_ptr(a), float_ptr(b), float_ptr(c),
                        float_ptr(mean), to_dtype(grad_out.scalar_type()), to_dtype(dy_dtype), grad_out.numel(), K,
                        grad_out.size(2) * grad_out.size(3), fmt == at::MemoryFormat::ChannelsLast, relu,
                        c10::cuda::getCurrentCUDAStream());
  return {dy, gres};
}

}  // namespace resconv
