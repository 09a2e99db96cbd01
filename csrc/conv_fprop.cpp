// Launcher of the fused conv fprop: checks, layout, the kernel choice, launch.
//
// Kernel choice (never a silent refusal):
//  * fp16 / bf16, and fp32 with allow_tf32: the tensor-core kernel when C/groups is a
//    multiple of 8 (16-bit) or 4 (fp32); with groups == 1 any other C is zero-padded up to
//    that multiple (e.g. the 3-channel RGB stem) and still runs on tensor cores;
//  * everything else (fp32 without TF32, grouped/depthwise convs whose C/groups is not such
//    a multiple): the SIMT kernel.
#include "filter_cache.h"
#include "hopper_host.h"
#include "ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAContextLight.h>

namespace resconv {
namespace {

struct Geometry {
  int64_t N, C, H, W, K, Cg, R, S, P, Q;
};

Geometry check_conv_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& scale,
                         const OptTensor& shift, const OptTensor& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_dim(x, 4, op, "input", "[N, C, H, W]");
  check_kernel_dtype(x, op, "input");
  check_dim(weight, 4, op, "weight", "[K, C/groups, R, S]");
  check_same_dtype(weight, x, op, "weight", "input");
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
                    ": stride: expected two positive ints, got ", stride);
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
                    ": dilation: expected two positive ints, got ", dilation);
  TORCH_CHECK_VALUE(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
                    op, ": padding: expected four non-negative ints (top, bottom, left, right), got ", padding);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= 65535, op, ": groups: expected an int in [1, 65535], got ", groups);
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = weight.size(0);
  g.Cg = weight.size(1);
  g.R = weight.size(2);
  g.S = weight.size(3);
  TORCH_CHECK_VALUE(g.C % groups == 0 && g.Cg * groups == g.C, op, ": weight: expected weight.shape[1] == C / groups = ",
                    g.C / groups, " for input with C = ", g.C, " and groups = ", groups, ", got weight of shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(g.K >= 1 && g.K % groups == 0, op, ": weight: expected K = weight.shape[0] >= 1 divisible by groups = ",
                    groups, ", got ", g.K);
  TORCH_CHECK_VALUE(g.R >= 1 && g.S >= 1, op, ": weight: expected a non-empty kernel, got shape ", weight.sizes());
  // Before the products below and the kernels' int casts.
  check_conv_ranges(op, stride, padding, dilation, g.R, g.S, "weight");
  const int64_t eff_r = dilation[0] * (g.R - 1) + 1;
  const int64_t eff_s = dilation[1] * (g.S - 1) + 1;
  const int64_t hp = g.H + padding[0] + padding[1];
  const int64_t wp = g.W + padding[2] + padding[3];
  TORCH_CHECK_VALUE(hp >= eff_r && wp >= eff_s, op, ": input: padded input size (", hp, " x ", wp,
                    ") is smaller than the dilated kernel (", eff_r, " x ", eff_s, ")");
  g.P = (hp - eff_r) / stride[0] + 1;
  g.Q = (wp - eff_s) / stride[1] + 1;
  check_channel_vector(scale, g.K, op, "scale");
  check_channel_vector(shift, g.K, op, "shift");
  if (residual.has_value()) {
    const std::vector<int64_t> shape{g.N, g.K, g.P, g.Q};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(shape), op, ": residual: expected the output's shape ",
                      at::IntArrayRef(shape), ", got ", residual->sizes());
    check_same_dtype(*residual, x, op, "residual", "input");
  }
  // Index arithmetic inside the kernels: rows and reduction in 32 bits, offsets in 64.
  const int64_t M = g.N * g.P * g.Q;
  TORCH_CHECK_VALUE(M < (int64_t(1) << 31) - 256, op, ": input: N*P*Q = ", M, " output pixels exceed 2^31 - 256");
  TORCH_CHECK_VALUE(g.Cg * g.R * g.S < (int64_t(1) << 31) && g.H < (int64_t(1) << 31) && g.W < (int64_t(1) << 31),
                    op, ": input: sizes exceed 2^31");
  return g;
}

// After every shape/dtype check: where the tensors live.
void check_conv_devices(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& scale,
                        const OptTensor& shift, const OptTensor& residual) {
  check_cuda(x, op, "input");
  check_same_device(weight, x, op, "weight", "input");
  check_same_device(scale, x, op, "scale", "input");
  check_same_device(shift, x, op, "shift", "input");
  check_same_device(residual, x, op, "residual", "input");
}

// The Hopper path (hopper_plan.h decides): true when it ran; false to fall back to the
// hand-written kernels (the plan refused, or CUTLASS did: then a one-time warning).
bool hopper_fprop(const char* op, const Geometry& g, const Tensor& x_in, const Tensor& weight_in,
                  const OptTensor& scale_in, const OptTensor& shift_in, const OptTensor& residual_in,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                  bool allow_tf32, bool channels_last, ForcedKernel forced, Tensor& out, Tensor& count, Tensor& mean,
                  Tensor& m2) {
  const bool stats = mean.defined();
  HopperCall c = hopper_call(HopperOp::Fprop, x_in, allow_tf32, {g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q}, stride,
                             padding, dilation, groups);
  c.out_channels_last = channels_last;
  c.stats_with_epilogue = stats && (scale_in.has_value() || residual_in.has_value() || relu);
  if (!take_hopper_path(op, hopper_unsupported(c), forced)) return false;
  // Dense channels-last operands with 16-byte aligned bases (TMA); the stem's C padded to 8.
  const int64_t Cp = hopper_padded_channels(c);
  const Tensor x = Cp != g.C ? pad_channels_last(x_in, 8) : channels_last_aligned(x_in);
  const Tensor w = packed_filter(weight_in, FilterLayout::KRSC, 1, Cp != g.C ? 8 : 1).t;
  const Tensor res = residual_in.has_value() ? channels_last_aligned(*residual_in) : Tensor();
  const Tensor scale = as_float_vector(scale_in), shift = as_float_vector(shift_in);
  HopperConv conv;
  conv.call = c;
  conv.call.C = Cp;
  conv.a = x.data_ptr();
  conv.b = w.data_ptr();
  conv.d = out.data_ptr();  // channels-last: [N, P, Q, K] dense
  conv.d_sn = out.stride(0), conv.d_sh = out.stride(2), conv.d_sw = out.stride(3);
  conv.residual = data_or_null(res);
  conv.scale = float_ptr(scale);
  conv.shift = float_ptr(shift);
  conv.relu = relu;
  if (stats) {
    conv.stat_count = count.data_ptr<float>();
    conv.stat_mean = mean.data_ptr<float>();
    conv.stat_m2 = m2.data_ptr<float>();
  }
  conv.sm_count = static_cast<int>(c.sm_count);
  return hopper_launch(op, conv, x, forced);
}

// Widest tile that still gives every SM about two CTAs.
ConvTile pick_tile(int64_t M, int64_t Kg, int64_t groups, int sms) {
  auto ctas = [&](int64_t bm, int64_t bn) { return (M + bm - 1) / bm * ((Kg + bn - 1) / bn) * groups; };
  if (Kg > 64 && ctas(128, 128) >= 2 * sms) return ConvTile::M128N128;
  if (ctas(128, 64) >= 2 * sms) return ConvTile::M128N64;
  return ConvTile::M64N64;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv2d_fprop_impl(
    const char* op, const Tensor& x_in, const Tensor& weight_in, const OptTensor& scale_in, const OptTensor& shift_in,
    const OptTensor& residual_in, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool relu, bool allow_tf32, bool channels_last, bool stats) {
  const Geometry g = check_conv_args(op, x_in, weight_in, scale_in, shift_in, residual_in, stride, padding, dilation,
                                     groups);
  check_conv_devices(op, x_in, weight_in, scale_in, shift_in, residual_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto out_fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const int64_t M = g.N * g.P * g.Q;
  const int64_t T = (M + kStatsTileRows - 1) / kStatsTileRows;
  Tensor out = new_output({g.N, g.K, g.P, g.Q}, x_in.options(), out_fmt);
  Tensor count, mean, m2;
  if (stats) {
    const auto f32 = x_in.options().dtype(at::kFloat);
    count = new_output({T}, f32);
    mean = new_output({T, g.K}, f32);
    m2 = new_output({T, g.K}, f32);
  }
  if (M == 0) return {out, count, mean, m2};

  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, got ", props->major, ".",
              props->minor);
  const bool is_f32 = x_in.scalar_type() == at::kFloat;
  const int64_t vec = 16 / x_in.element_size();
  const bool tensor_cores = !is_f32 || allow_tf32;
  const bool tc_fits = g.Cg % vec == 0;
  ConvTile forced_tile = ConvTile::M64N64;
  const ForcedKernel forced = forced_conv_kernel(forced_tile);
  if (hopper_fprop(op, g, x_in, weight_in, scale_in, shift_in, residual_in, stride, padding, dilation, groups, relu,
                   allow_tf32, channels_last, forced, out, count, mean, m2))
    return {out, count, mean, m2};
  const bool use_tc = tensor_cores && (tc_fits || groups == 1) && forced != ForcedKernel::Simt;

  // The filter in K R S C order from the cache (repacked once per change, not per call); the
  // input's channels padded (the stem: a fresh copy, the input changes every call).
  const bool pad = use_tc && !tc_fits;
  const Tensor w = packed_filter(weight_in, FilterLayout::KRSC, groups, pad ? vec : 1).t;
  const Tensor x = pad ? pad_channels_last(x_in, vec)
                       : (use_tc ? channels_last_aligned(x_in) : dense_in(x_in, at::MemoryFormat::ChannelsLast));
  const int64_t C = x.size(1), Cg = pad ? C : g.Cg;
  const Tensor scale = as_float_vector(scale_in);
  const Tensor shift = as_float_vector(shift_in);
  const Tensor res = residual_in.has_value() ? dense_in(*residual_in, out_fmt) : Tensor();

  ConvFpropParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.out = out.data_ptr();
  p.scale = float_ptr(scale);
  p.shift = float_ptr(shift);
  p.res = data_or_null(res);
  if (stats) {
    p.stat_count = count.data_ptr<float>();
    p.stat_mean = mean.data_ptr<float>();
    p.stat_m2 = m2.data_ptr<float>();
  }
  p.N = g.N;
  p.C = C;
  p.H = g.H;
  p.W = g.W;
  p.K = g.K;
  p.R = g.R;
  p.S = g.S;
  p.P = g.P;
  p.Q = g.Q;
  p.Cg = Cg;
  p.Kg = g.K / groups;
  p.groups = groups;
  p.M = M;
  p.Kred = Cg * g.R * g.S;
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[2]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  p.out_sn = out.stride(0);
  p.out_sk = out.stride(1);
  p.out_sp = out.stride(2);
  p.out_sq = out.stride(3);
  p.relu = relu;
  p.vec_out = channels_last && p.Kg % vec == 0 && aligned16(out) && aligned16(res);
  p.tap = tap_geometry(static_cast<int>(Cg), static_cast<int>(g.S), p.dil_h, p.dil_w, g.W, C,
                       static_cast<int>(kFpropSliceBytes / x.element_size()));

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = to_dtype(x.scalar_type());
  if (use_tc) {
    const ConvTile tile =
        forced == ForcedKernel::Tile ? forced_tile : pick_tile(M, p.Kg, groups, props->multiProcessorCount);
    TORCH_CHECK(static_cast<size_t>(conv_fprop_tc_smem_bytes(tile)) <= props->sharedMemPerBlockOptin, op,
                ": the tensor-core kernel needs ", conv_fprop_tc_smem_bytes(tile),
                " bytes of shared memory per block, this GPU allows ", props->sharedMemPerBlockOptin);
    const int64_t bm = tile == ConvTile::M64N64 ? 64 : 128;
    const int64_t bn = tile == ConvTile::M128N128 ? 128 : 64;
    TORCH_CHECK_VALUE((M + bm - 1) / bm * ((p.Kg + bn - 1) / bn) < (int64_t(1) << 31), op, ": too many output tiles");
    launch_conv_fprop_tc(p, dt, tile, stream);
  } else {
    TORCH_CHECK_VALUE((M + 63) / 64 * ((p.Kg + 63) / 64) < (int64_t(1) << 31), op, ": too many output tiles");
    launch_conv_fprop_simt(p, dt, stream);
  }
  return {out, count, mean, m2};
}

}  // namespace

Tensor conv2d_fprop(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& shift,
                    const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool relu, bool allow_tf32, bool channels_last) {
  return std::get<0>(conv2d_fprop_impl("resconv::cuda_conv2d_fprop", x, weight, scale, shift, residual, stride, padding,
                                       dilation, groups, relu, allow_tf32, channels_last, false));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv2d_fprop_stats(
    const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool relu, bool allow_tf32, bool channels_last) {
  return conv2d_fprop_impl("resconv::cuda_conv2d_fprop_stats", x, weight, scale, shift, residual, stride, padding,
                           dilation, groups, relu, allow_tf32, channels_last, true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv2d_bn_train(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, double eps, bool relu, bool allow_tf32, bool channels_last) {
  const char* op = "resconv::cuda_conv2d_bn_train";
  // Everything is checked before the first kernel runs.
  check_conv_args(op, x, weight, std::nullopt, bias, residual, stride, padding, dilation, groups);
  check_channel_vector(bn_weight, weight.size(0), op, "bn_weight");
  check_channel_vector(bn_bias, weight.size(0), op, "bn_bias");
  check_conv_devices(op, x, weight, std::nullopt, bias, residual);
  check_same_device(bn_weight, x, op, "bn_weight", "input");
  check_same_device(bn_bias, x, op, "bn_bias", "input");
  auto [y, count, pmean, pm2] = conv2d_fprop_impl(op, x, weight, std::nullopt, bias, std::nullopt, stride, padding,
                                                  dilation, groups, false, allow_tf32, channels_last, true);
  auto [mean, invstd, var_unbiased, a, b] = bn_finalize(count, pmean, pm2, bn_weight, bn_bias, eps);
  // The centred apply (y - mean) * a + beta: folding the mean into b loses log2(|mean| / std)
  // bits where y has a large common offset.
  const Tensor beta = bn_bias.has_value() ? as_float_vector(bn_bias) : at::zeros({mean.size(0)}, mean.options());
  Tensor out = scale_shift_act_impl(op, y, a, beta, mean, residual, relu,
                                    channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return {out, y, mean, invstd, var_unbiased};
}

}  // namespace resconv
