// Host-side helpers of the launchers: argument checks with messages that name the op and the
// argument, layout rules, output allocation. Compiled by the host compiler only.
#pragma once

// Tensor methods and the few ATen functions named below only: the full ATen/ATen.h costs
// tens of seconds of compile time per file.
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "kernels.h"

namespace resconv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The same rule as resconv._conv_args.is_channels_last (the fake implementations use that
// one): NCHW when contiguous (also where both layouts coincide), NHWC when channels-last
// contiguous, else NHWC when the channel stride is the smallest.
bool is_channels_last(const Tensor& t);
inline at::MemoryFormat memory_format_of(const Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// t itself if it is dense in `fmt`, else a dense copy.
Tensor dense_in(const Tensor& t, at::MemoryFormat fmt);

// torch.empty for kernel outputs; NaN-filled when RESCONV_POISON=1 (a test aid: an element a
// kernel fails to write then fails every comparison).
Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                  at::MemoryFormat fmt = at::MemoryFormat::Contiguous);

DType to_dtype(at::ScalarType s);

// Kernel storage dtypes: float16, bfloat16, float32.
void check_kernel_dtype(const Tensor& t, const char* op, const char* name);
void check_dim(const Tensor& t, int64_t dim, const char* op, const char* name, const char* shape_doc);
void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name);
void check_same_shape(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name);
// [K] vector of a floating dtype.
void check_channel_vector(const OptTensor& t, int64_t K, const char* op, const char* name);
// After the shape/dtype checks: t must be a CUDA tensor (the error CPU callers see) ...
void check_cuda(const Tensor& t, const char* op, const char* name);
// ... on ref's device.
void check_same_device(const OptTensor& t, const Tensor& ref, const char* op, const char* name,
                       const char* ref_name);

// Upper bounds of the conv arguments, checked before any product or int cast of them (the
// kernels take stride, padding and dilation as int): stride and dilation below 2^16, padding
// below 2^30, kernel sizes R, S below 2^16. ValueError naming the argument otherwise.
void check_conv_ranges(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t R, int64_t S, const char* weight_name);

// [K] fp32 contiguous copy (or t itself), undefined Tensor when absent.
Tensor as_float_vector(const OptTensor& t);

inline const float* float_ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
inline const void* data_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Test aid for the conv kernels (fprop, dgrad, wgrad): RESCONV_CUDA_CONV_KERNEL=
// tc128x128|tc128x64|tc64x64|simt forces a hand-written kernel where the call allows it (the
// tensor cores never serve float32 without TF32, nor channel counts that are not a multiple of
// the vector width), so small test shapes reach every kernel; `hopper` requires the Hopper
// kernels (ValueError with the plan's reason where they cannot serve the call; with the
// switch on). Tile: `tile` is set. Raises ValueError on an unknown value.
enum class ForcedKernel { Auto, Tile, Simt, Hopper };
ForcedKernel forced_conv_kernel(ConvTile& tile);

// Whether t's data (if defined) starts on a 16-byte boundary (cp.async / vector accesses).
inline bool aligned16(const Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Dense in `fmt` with a 16-byte aligned base (cp.async reads 16-byte vectors): t or a copy.
Tensor dense_aligned(const Tensor& t, at::MemoryFormat fmt);
inline Tensor channels_last_aligned(const Tensor& t) { return dense_aligned(t, at::MemoryFormat::ChannelsLast); }

// t [N, C, H, W] (an input, or a filter [K, C, R, S]) with C zero-padded to a multiple of
// `vec` channels, channels-last, 16-byte aligned (a fresh copy: the RGB stem on tensor cores,
// groups == 1 only).
Tensor pad_channels_last(const Tensor& x, int64_t vec);

// [N, K, P, Q] dense tensor viewed as [N, K, L].
NKLView nkl_view(const Tensor& t);

}  // namespace resconv
