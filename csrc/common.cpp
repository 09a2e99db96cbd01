#include "common.h"

#include <cstdlib>
#include <cstring>
#include <limits>

namespace resconv {

bool is_channels_last(const Tensor& t) {
  if (t.dim() != 4 || t.is_contiguous()) return false;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  return t.stride(1) <= std::min(t.stride(2), t.stride(3));
}

Tensor dense_in(const Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

Tensor dense_aligned(const Tensor& t, at::MemoryFormat fmt) {
  Tensor d = dense_in(t, fmt);
  return aligned16(d) ? d : d.clone(fmt);
}

static bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("RESCONV_POISON");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
  Tensor t = at::empty(sizes, opts.memory_format(fmt));
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kFloat:
      return DType::Float;
    case at::kDouble:
      return DType::Double;
    default:
      TORCH_CHECK_TYPE(false, "resconv CUDA kernels: unsupported dtype ", s);
  }
}

void check_kernel_dtype(const Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat, op, ": ", name,
                   ": expected dtype float16, bfloat16 or float32, got ", s);
}

void check_dim(const Tensor& t, int64_t dim, const char* op, const char* name, const char* shape_doc) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, ": expected a ", dim, "-D tensor ", shape_doc, ", got shape ",
                    t.sizes());
}

void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, ": expected dtype ", ref.scalar_type(),
                   " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

void check_same_shape(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, ": expected the shape of ", ref_name, " ", ref.sizes(),
                    ", got ", t.sizes());
}

void check_channel_vector(const OptTensor& t, int64_t K, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, op, ": ", name, ": expected shape [", K,
                    "] (one value per channel), got ", t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name, ": expected a floating dtype, got ",
                   t->scalar_type());
}

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got a tensor on ", t.device(),
              " (resconv's CUDA C++ ops run on CUDA tensors only; use backend='torch' or 'triton')");
}

void check_same_device(const OptTensor& t, const Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->device() == ref.device(), op, ": ", name, ": expected a tensor on ", ref_name, "'s device ",
                    ref.device(), ", got ", t->device());
}

void check_conv_ranges(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t R, int64_t S, const char* weight_name) {
  constexpr int64_t k16 = int64_t(1) << 16, k30 = int64_t(1) << 30;
  for (const int64_t v : stride) TORCH_CHECK_VALUE(v < k16, op, ": stride: expected values below 65536, got ", stride);
  for (const int64_t v : dilation)
    TORCH_CHECK_VALUE(v < k16, op, ": dilation: expected values below 65536, got ", dilation);
  for (const int64_t v : padding)
    TORCH_CHECK_VALUE(v < k30, op, ": padding: expected values below 2^30, got ", padding);
  TORCH_CHECK_VALUE(R < k16 && S < k16, op, ": ", weight_name, ": expected a kernel size below 65536, got ", R, " x ",
                    S);
}

Tensor as_float_vector(const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->to(at::kFloat).contiguous();
}

ForcedKernel forced_conv_kernel(ConvTile& tile) {
  const char* v = std::getenv("RESCONV_CUDA_CONV_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return ForcedKernel::Auto;
  if (std::strcmp(v, "simt") == 0) return ForcedKernel::Simt;
  if (std::strcmp(v, "hopper") == 0) return ForcedKernel::Hopper;
  if (std::strcmp(v, "tc128x128") == 0) tile = ConvTile::M128N128;
  else if (std::strcmp(v, "tc128x64") == 0) tile = ConvTile::M128N64;
  else if (std::strcmp(v, "tc64x64") == 0) tile = ConvTile::M64N64;
  else
    TORCH_CHECK_VALUE(false,
                      "RESCONV_CUDA_CONV_KERNEL: expected auto, hopper, tc128x128, tc128x64, tc64x64 or simt, got '", v,
                      "'");
  return ForcedKernel::Tile;
}

Tensor pad_channels_last(const Tensor& x, int64_t vec) {
  const int64_t C = x.size(1);
  const int64_t Cp = (C + vec - 1) / vec * vec;
  // at::empty honours the options' memory format; at::zeros drops it (it returned an NCHW
  // tensor here, which the kernels then read as NHWC).
  Tensor xp = at::empty({x.size(0), Cp, x.size(2), x.size(3)}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  xp.zero_();
  xp.narrow(1, 0, C).copy_(x);
  return xp;
}

NKLView nkl_view(const Tensor& t) {
  const int64_t K = t.size(1);
  const int64_t L = t.size(2) * t.size(3);
  NKLView v;
  v.data = t.data_ptr();
  if (is_channels_last(t)) {
    v.sn = L * K;
    v.sk = 1;
    v.sl = K;
  } else {
    v.sn = K * L;
    v.sk = L;
    v.sl = 1;
  }
  return v;
}

}  // namespace resconv
