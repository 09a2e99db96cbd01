// Launchers of the BatchNorm statistics kernels: finalize, running-statistics update,
// backward reductions.
#include "ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace resconv {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_finalize(const Tensor& count, const Tensor& mean,
                                                               const Tensor& m2, const OptTensor& weight,
                                                               const OptTensor& bias, double eps) {
  const char* op = "resconv::cuda_bn_finalize";
  check_dim(count, 1, op, "count", "[T]");
  check_dim(mean, 2, op, "mean", "[T, K]");
  check_same_shape(m2, mean, op, "m2", "mean");
  TORCH_CHECK_VALUE(count.size(0) == mean.size(0), op, ": count: expected ", mean.size(0),
                    " partials (mean.shape[0]), got ", count.size(0));
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{count, "count"}, {mean, "mean"}, {m2, "m2"}})
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, ": expected float32, got ", t.scalar_type());
  const int64_t T = mean.size(0);
  const int64_t K = mean.size(1);
  check_channel_vector(weight, K, op, "weight");
  check_channel_vector(bias, K, op, "bias");
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps: expected a non-negative value, got ", eps);
  check_cuda(mean, op, "mean");
  check_same_device(count, mean, op, "count", "mean");
  check_same_device(m2, mean, op, "m2", "mean");
  check_same_device(weight, mean, op, "weight", "mean");
  check_same_device(bias, mean, op, "bias", "mean");
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto f32 = mean.options().dtype(at::kFloat);
  Tensor out_mean = new_output({K}, f32), invstd = new_output({K}, f32), var = new_output({K}, f32),
         a = new_output({K}, f32), b = new_output({K}, f32);
  if (K == 0) return {out_mean, invstd, var, a, b};
  const Tensor c = count.contiguous(), mu = mean.contiguous(), sq = m2.contiguous();
  const Tensor gamma = as_float_vector(weight), beta = as_float_vector(bias);
  TORCH_CHECK_VALUE(tree_level_rows(T) < (int64_t(1) << 31) && (K + 31) / 32 <= 65535, op, ": mean: too large, shape ",
                    mean.sizes());
  Tensor workspace = at::empty({tree_workspace_floats(T, K, 2, true)}, f32);
  launch_bn_finalize(c.data_ptr<float>(), mu.data_ptr<float>(), sq.data_ptr<float>(), T, K, float_ptr(gamma),
                     float_ptr(beta), eps, out_mean.data_ptr<float>(), invstd.data_ptr<float>(), var.data_ptr<float>(),
                     a.data_ptr<float>(), b.data_ptr<float>(), workspace.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream());
  return {out_mean, invstd, var, a, b};
}

void bn_update_running_stats_(const OptTensor& running_mean, const OptTensor& running_var, const Tensor& mean,
                              const Tensor& var_unbiased, double momentum) {
  const char* op = "resconv::cuda_bn_update_running_stats_";
  check_dim(mean, 1, op, "mean", "[K]");
  const int64_t K = mean.size(0);
  check_channel_vector(var_unbiased, K, op, "var_unbiased");
  for (const auto& [t, name] : {std::pair<const OptTensor&, const char*>{running_mean, "running_mean"},
                                {running_var, "running_var"}}) {
    if (!t.has_value()) continue;
    check_channel_vector(t, K, op, name);
    TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, ": expected a contiguous tensor to update in place");
  }
  check_cuda(mean, op, "mean");
  check_same_device(var_unbiased, mean, op, "var_unbiased", "mean");
  check_same_device(running_mean, mean, op, "running_mean", "mean");
  check_same_device(running_var, mean, op, "running_var", "mean");
  if (K == 0 || (!running_mean.has_value() && !running_var.has_value())) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  const Tensor mu = mean.to(at::kFloat).contiguous();
  const Tensor var = var_unbiased.to(at::kFloat).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto update = [&](void* rm, void* rv, at::ScalarType s) {
    launch_update_running_stats(rm, rv, to_dtype(s), mu.data_ptr<float>(), var.data_ptr<float>(), K, momentum, stream);
  };
  const bool both = running_mean.has_value() && running_var.has_value();
  if (both && running_mean->scalar_type() == running_var->scalar_type()) {
    update(running_mean->data_ptr(), running_var->data_ptr(), running_mean->scalar_type());
    return;
  }
  if (running_mean.has_value()) update(running_mean->data_ptr(), nullptr, running_mean->scalar_type());
  if (running_var.has_value()) update(nullptr, running_var->data_ptr(), running_var->scalar_type());
}

std::tuple<Tensor, Tensor> bn_backward_reduce(const Tensor& grad_out_in, const OptTensor& out_in,
                                              const OptTensor& y_in, const OptTensor& mean_in, bool relu) {
  const char* op = "resconv::cuda_bn_backward_reduce";
  check_dim(grad_out_in, 4, op, "grad_out", "[N, K, P, Q]");
  check_kernel_dtype(grad_out_in, op, "grad_out");
  TORCH_CHECK_VALUE(!relu || out_in.has_value(), op, ": out: required when relu=True (its sign is the ReLU mask)");
  for (const auto& [t, name] : {std::pair<const OptTensor&, const char*>{out_in, "out"}, {y_in, "y"}}) {
    if (!t.has_value()) continue;
    check_same_shape(*t, grad_out_in, op, name, "grad_out");
    check_same_dtype(*t, grad_out_in, op, name, "grad_out");
  }
  const int64_t N = grad_out_in.size(0), K = grad_out_in.size(1);
  const int64_t L = grad_out_in.size(2) * grad_out_in.size(3);
  check_channel_vector(mean_in, K, op, "mean");
  check_cuda(grad_out_in, op, "grad_out");
  check_same_device(out_in, grad_out_in, op, "out", "grad_out");
  check_same_device(y_in, grad_out_in, op, "y", "grad_out");
  check_same_device(mean_in, grad_out_in, op, "mean", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto f32 = grad_out_in.options().dtype(at::kFloat);
  Tensor sum_g = new_output({K}, f32);
  Tensor sum_gy = new_output({K}, f32);
  if (K == 0) return {sum_g, sum_gy};
  const bool has_y = y_in.has_value();
  if (N * L == 0 || !has_y) sum_gy.zero_();
  if (N * L == 0) {
    sum_g.zero_();
    return {sum_g, sum_gy};
  }
  // The gradient is read in the layout of the tensor it is combined with (like the Triton op).
  const Tensor& like = relu ? *out_in : (has_y ? *y_in : grad_out_in);
  const Tensor grad_out = dense_in(grad_out_in, memory_format_of(like));
  const Tensor out = relu ? dense_in(*out_in, memory_format_of(*out_in)) : Tensor();
  const Tensor y = has_y ? dense_in(*y_in, memory_format_of(*y_in)) : Tensor();
  const Tensor mean = has_y ? (mean_in.has_value() ? as_float_vector(mean_in) : at::zeros({K}, f32)) : Tensor();
  const int64_t T = (N * L + kReduceRows - 1) / kReduceRows;
  TORCH_CHECK_VALUE(T < (int64_t(1) << 31) && (K + 31) / 32 <= 65535, op, ": grad_out: too large, shape ",
                    grad_out.sizes());
  Tensor partial_g = at::empty({T, K}, f32);
  Tensor partial_gy = has_y ? at::empty({T, K}, f32) : Tensor();
  Tensor workspace = at::empty({tree_workspace_floats(T, K, 2, false)}, f32);
  const NKLView none{nullptr, 0, 0, 0};
  launch_bn_backward_reduce(nkl_view(grad_out), relu ? nkl_view(out) : none, has_y ? nkl_view(y) : none,
                            float_ptr(mean), to_dtype(grad_out.scalar_type()), N, K, L, relu,
                            partial_g.data_ptr<float>(), has_y ? partial_gy.data_ptr<float>() : nullptr,
                            sum_g.data_ptr<float>(), has_y ? sum_gy.data_ptr<float>() : nullptr,
                            workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return {sum_g, sum_gy};
}

}  // namespace resconv
