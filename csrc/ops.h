// The ops' C++ entry points (registered in ops.cpp). Each validates its arguments (messages
// name the op and the argument), guards the device, runs on the current CUDA stream, returns
// early on empty tensors. Shapes use the field names: x [N, C, H, W], weight [K, C/groups, R, S],
// out [N, K, P, Q]; padding is (top, bottom, left, right).
#pragma once

#include <tuple>

#include "common.h"

namespace resconv {

// act(scale[k] * conv2d(x, weight) + shift[k] + residual), in x's dtype, channels-last when
// `channels_last` else NCHW. fp32 uses TF32 tensor cores only when allow_tf32.
Tensor conv2d_fprop(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& shift,
                    const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool relu, bool allow_tf32, bool channels_last);

// conv2d_fprop plus the BatchNorm partials of y = scale * conv + shift:
// (out, count [T], mean [T, K], m2 [T, K]) with T = ceil(N*P*Q / kStatsTileRows).
std::tuple<Tensor, Tensor, Tensor, Tensor> conv2d_fprop_stats(
    const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool relu, bool allow_tf32, bool channels_last);

// Training-mode conv + BatchNorm (batch statistics) + residual + ReLU:
// (out, y = conv + bias, mean, invstd, var_unbiased), statistics [K] fp32; out is the centred
// apply act((y - mean) * gamma * invstd + beta + residual).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv2d_bn_train(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, double eps, bool relu, bool allow_tf32, bool channels_last);

// Chan merge of partials: (mean, invstd, var_unbiased, a = gamma*invstd, b = beta - mean*a).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_finalize(const Tensor& count, const Tensor& mean,
                                                               const Tensor& m2, const OptTensor& weight,
                                                               const OptTensor& bias, double eps);

// running = (1 - momentum) * running + momentum * batch, in place (either may be absent).
void bn_update_running_stats_(const OptTensor& running_mean, const OptTensor& running_var, const Tensor& mean,
                              const Tensor& var_unbiased, double momentum);

// act((y - center[k]) * a[k] + b[k] + residual) in y's dtype and layout (center, with a and b,
// optional: the centred BatchNorm apply).
Tensor scale_shift_act(const Tensor& y, const OptTensor& a, const OptTensor& b, const OptTensor& residual,
                       bool relu, const OptTensor& center);
Tensor add_relu(const Tensor& x, const Tensor& residual, bool relu);
// scale_shift_act with the output layout given (operands are read dense in it); `op` names
// the calling op in error messages.
Tensor scale_shift_act_impl(const char* op, const Tensor& y, const OptTensor& a, const OptTensor& b,
                            const OptTensor& center, const OptTensor& residual, bool relu, at::MemoryFormat fmt);

// (sum(g), sum(g * (y - mean))) per channel, g = grad_out * (out > 0 if relu); zeros when y absent.
std::tuple<Tensor, Tensor> bn_backward_reduce(const Tensor& grad_out, const OptTensor& out, const OptTensor& y,
                                              const OptTensor& mean, bool relu);

// (dy, grad_residual): dy = a*g + b*(y - mean) + c; grad_residual = g, or an empty [0] tensor
// unless want_grad_residual.
std::tuple<Tensor, Tensor> bn_backward_dy(const Tensor& grad_out, const OptTensor& out, const OptTensor& y,
                                          const Tensor& a, const OptTensor& b, const OptTensor& c,
                                          const OptTensor& mean, bool relu, bool want_grad_residual,
                                          at::ScalarType dy_dtype);

// Conv backward with the optional fused dReLU/dBN prologue: with `a` given, the gradient at
// the conv output is dy = a[k]*where(relu_out > 0, grad, 0) + b[k]*(y - mean[k]) + c[k]
// (relu_out, y optional; b, c, mean required with y and used only with it), formed while the
// kernels load their operands; without `a`, grad is dy. grad, relu_out, y share the operand
// dtype (weight's for dgrad, x's for wgrad). fp32 uses TF32 tensor cores only when allow_tf32.
//
// dx [N, C, H, W] = input_size, in weight's dtype, channels-last when `channels_last` else NCHW.
Tensor conv2d_dgrad(const Tensor& grad, const Tensor& weight, const OptTensor& relu_out, const OptTensor& y,
                    const OptTensor& a, const OptTensor& b, const OptTensor& c, const OptTensor& mean,
                    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool channels_last, bool allow_tf32);

// (dW [K, C/groups, R, S] = weight_size in x's dtype, channels-last (K R S C order) when
// weight_channels_last; db [K] in x's dtype, or an empty [0] tensor unless need_bias).
// split_k: 0 chooses the number of N*P*Q splits; the result is bitwise reproducible for a
// given split count (fixed-order second pass).
std::tuple<Tensor, Tensor> conv2d_wgrad(const Tensor& grad, const Tensor& x, const OptTensor& relu_out,
                                        const OptTensor& y, const OptTensor& a, const OptTensor& b,
                                        const OptTensor& c, const OptTensor& mean, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, bool need_bias, bool weight_channels_last, bool allow_tf32,
                                        int64_t split_k);

}  // namespace resconv
