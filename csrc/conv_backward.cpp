// Launchers of the conv backward: dgrad (input gradient) and wgrad (weight and bias gradient),
// each optionally forming dy with the fused dReLU/dBN prologue. Checks, layout, kernel
// choice, launch.
//
// Kernel choice (never a silent refusal):
//  * fp16 / bf16, and fp32 with allow_tf32: the tensor-core kernels when K/groups is a
//    multiple of the 16-byte vector width (8 for 16-bit types, 4 for fp32) and, for wgrad,
//    C/groups too — with groups == 1 any C is zero-padded up to it (the RGB stem);
//  * everything else (IEEE fp32, depthwise / odd channel counts): the SIMT kernels.
// The tensor-core kernels read dy (with relu_out, y) and x channels-last (NHWC, the native
// layout): other layouts are converted here; the SIMT kernels read any layout through strides.
#include "filter_cache.h"
#include "hopper_host.h"
#include "ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAContextLight.h>

namespace resconv {
namespace {

struct Geometry {
  int64_t N, C, H, W, K, Cg, Kg, R, S, P, Q;
};

// The forward conv's geometry from the input sizes (named `input_name`) and the filter sizes
// (`weight_name`), with the checks and messages of the fprop launcher.
Geometry backward_geometry(const char* op, at::IntArrayRef in, const char* input_name, at::IntArrayRef wsz,
                           const char* weight_name, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(in.size() == 4 && in[0] >= 0 && in[1] >= 0 && in[2] >= 0 && in[3] >= 0, op, ": ", input_name,
                    ": expected four non-negative sizes [N, C, H, W], got ", in);
  TORCH_CHECK_VALUE(wsz.size() == 4 && wsz[0] >= 0 && wsz[1] >= 0 && wsz[2] >= 0 && wsz[3] >= 0, op, ": ",
                    weight_name, ": expected four non-negative sizes [K, C/groups, R, S], got ", wsz);
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
                    ": stride: expected two positive ints, got ", stride);
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
                    ": dilation: expected two positive ints, got ", dilation);
  TORCH_CHECK_VALUE(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
                    op, ": padding: expected four non-negative ints (top, bottom, left, right), got ", padding);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= 65535, op, ": groups: expected an int in [1, 65535], got ", groups);
  Geometry g;
  g.N = in[0];
  g.C = in[1];
  g.H = in[2];
  g.W = in[3];
  g.K = wsz[0];
  g.Cg = wsz[1];
  g.R = wsz[2];
  g.S = wsz[3];
  TORCH_CHECK_VALUE(g.Cg >= 1 && g.C % groups == 0 && g.Cg * groups == g.C, op, ": ", weight_name,
                    ": expected shape[1] == C / groups = ", g.C / groups, " >= 1 for an input with C = ", g.C,
                    " and groups = ", groups, ", got ", wsz);
  TORCH_CHECK_VALUE(g.K >= 1 && g.K % groups == 0, op, ": ", weight_name,
                    ": expected K = shape[0] >= 1 divisible by groups = ", groups, ", got ", g.K);
  TORCH_CHECK_VALUE(g.R >= 1 && g.S >= 1, op, ": ", weight_name, ": expected a non-empty kernel, got ", wsz);
  // Bounded so that the products below cannot overflow int64 (and the kernels' int casts hold).
  check_conv_ranges(op, stride, padding, dilation, g.R, g.S, weight_name);
  const int64_t eff_r = dilation[0] * (g.R - 1) + 1;
  const int64_t eff_s = dilation[1] * (g.S - 1) + 1;
  const int64_t hp = g.H + padding[0] + padding[1];
  const int64_t wp = g.W + padding[2] + padding[3];
  TORCH_CHECK_VALUE(hp >= eff_r && wp >= eff_s, op, ": ", input_name, ": padded input size (", hp, " x ", wp,
                    ") is smaller than the dilated kernel (", eff_r, " x ", eff_s, ")");
  g.P = (hp - eff_r) / stride[0] + 1;
  g.Q = (wp - eff_s) / stride[1] + 1;
  g.Kg = g.K / groups;
  // Index arithmetic inside the kernels: spatial sizes, rows and reductions in 32 bits,
  // element offsets in 64.
  TORCH_CHECK_VALUE(g.H < (int64_t(1) << 31) && g.W < (int64_t(1) << 31) && g.Cg * g.R * g.S < (int64_t(1) << 31) &&
                        g.Kg * g.R * g.S < (int64_t(1) << 31),
                    op, ": ", input_name, ": sizes exceed 2^31");
  return g;
}

// grad [N, K, P, Q] of the geometry, a kernel dtype; the prologue's tensors alike.
void check_grad_and_prologue(const char* op, const Tensor& grad, const Geometry& g, const OptTensor& relu_out,
                             const OptTensor& y, const OptTensor& a, const OptTensor& b, const OptTensor& c,
                             const OptTensor& mean) {
  const std::vector<int64_t> shape{g.N, g.K, g.P, g.Q};
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(shape), op, ": grad: expected the conv output's shape ",
                    at::IntArrayRef(shape), ", got ", grad.sizes());
  TORCH_CHECK_VALUE(a.has_value() || (!relu_out.has_value() && !y.has_value()), op,
                    ": a: required when relu_out or y is given (the prologue dy = a*where(relu_out > 0, grad, 0) + "
                    "b*(y - mean) + c)");
  TORCH_CHECK_VALUE(!y.has_value() || (b.has_value() && c.has_value() && mean.has_value()), op,
                    ": b, c, mean: required when y is given");
  for (const auto& [t, name] : {std::pair<const OptTensor&, const char*>{relu_out, "relu_out"}, {y, "y"}}) {
    if (!t.has_value()) continue;
    check_same_shape(*t, grad, op, name, "grad");
    check_same_dtype(*t, grad, op, name, "grad");
  }
  check_channel_vector(a, g.K, op, "a");
  check_channel_vector(b, g.K, op, "b");
  check_channel_vector(c, g.K, op, "c");
  check_channel_vector(mean, g.K, op, "mean");
}

void check_devices(const char* op, const Tensor& grad, const Tensor& other, const char* other_name,
                   const OptTensor& relu_out, const OptTensor& y, const OptTensor& a, const OptTensor& b,
                   const OptTensor& c, const OptTensor& mean) {
  check_cuda(grad, op, "grad");
  check_same_device(other, grad, op, other_name, "grad");
  check_same_device(relu_out, grad, op, "relu_out", "grad");
  check_same_device(y, grad, op, "y", "grad");
  check_same_device(a, grad, op, "a", "grad");
  check_same_device(b, grad, op, "b", "grad");
  check_same_device(c, grad, op, "c", "grad");
  check_same_device(mean, grad, op, "mean", "grad");
}

// dy and the prologue's tensors, dense in one layout (they share one set of strides), plus
// the fp32 coefficient vectors. `tc`: channels-last with 16-byte aligned bases.
struct DyOperands {
  Tensor dy, relu_out, y, a, b, c, mean;
};

DyOperands prepare_dy(const Tensor& grad, const OptTensor& relu_out, const OptTensor& y, const OptTensor& a,
                      const OptTensor& b, const OptTensor& c, const OptTensor& mean, bool tc) {
  const Tensor& like = relu_out.has_value() ? *relu_out : (y.has_value() ? *y : grad);
  const auto fmt = tc ? at::MemoryFormat::ChannelsLast : memory_format_of(like);
  auto prep = [&](const Tensor& t) { return tc ? dense_aligned(t, fmt) : dense_in(t, fmt); };
  DyOperands o;
  o.dy = prep(grad);
  if (a.has_value()) {  // without `a` there is no prologue: relu_out / y are absent (checked)
    if (relu_out.has_value()) o.relu_out = prep(*relu_out);
    if (y.has_value()) {
      o.y = prep(*y);
      o.b = as_float_vector(b);
      o.c = as_float_vector(c);
      o.mean = as_float_vector(mean);
    }
    o.a = as_float_vector(a);
  }
  return o;
}

DyPrologueArgs prologue_args(const DyOperands& o) {
  DyPrologueArgs pro{};
  pro.relu_out = data_or_null(o.relu_out);
  pro.y = data_or_null(o.y);
  pro.a = float_ptr(o.a);
  pro.b = float_ptr(o.b);
  pro.c = float_ptr(o.c);
  pro.mean = float_ptr(o.mean);
  return pro;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The Hopper plan's view of this backward call (hopper_plan.h).
HopperCall hopper_backward_call(HopperOp op, const Tensor& grad, const Geometry& g, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool allow_tf32,
                                bool prologue, bool out_channels_last) {
  HopperCall c = hopper_call(op, grad, allow_tf32, {g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q}, stride, padding,
                             dilation, groups);
  c.prologue = prologue;
  c.out_channels_last = out_channels_last;
  return c;
}

int64_t tile_rows(ConvTile t) { return t == ConvTile::M64N64 ? 64 : 128; }
int64_t tile_cols(ConvTile t) { return t == ConvTile::M128N128 ? 128 : 64; }

}  // namespace

Tensor conv2d_dgrad(const Tensor& grad, const Tensor& weight, const OptTensor& relu_out, const OptTensor& y,
                    const OptTensor& a, const OptTensor& b, const OptTensor& c, const OptTensor& mean,
                    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool channels_last, bool allow_tf32) {
  const char* op = "resconv::cuda_conv2d_dgrad";
  check_dim(grad, 4, op, "grad", "[N, K, P, Q]");
  check_kernel_dtype(grad, op, "grad");
  check_dim(weight, 4, op, "weight", "[K, C/groups, R, S]");
  check_same_dtype(weight, grad, op, "weight", "grad");
  const Geometry g =
      backward_geometry(op, input_size, "input_size", weight.sizes(), "weight", stride, padding, dilation, groups);
  check_grad_and_prologue(op, grad, g, relu_out, y, a, b, c, mean);
  const int64_t phases = stride[0] * stride[1];
  TORCH_CHECK_VALUE(phases <= 65535, op, ": stride: at most 65535 stride phases (stride_h * stride_w), got ", phases);
  const int64_t M_max = dgrad_max_phase_rows(g.N, g.H, g.W, stride[0], stride[1]);
  TORCH_CHECK_VALUE(M_max < (int64_t(1) << 31) - 256, op, ": input_size: N * ceil(H/stride_h) * ceil(W/stride_w) = ",
                    M_max, " rows exceed 2^31 - 256");
  check_devices(op, grad, weight, "weight", relu_out, y, a, b, c, mean);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto out_fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor dx = new_output(input_size, weight.options(), out_fmt);
  if (dx.numel() == 0) return dx;

  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, got ", props->major, ".",
              props->minor);
  const bool is_f32 = grad.scalar_type() == at::kFloat;
  const int64_t vec = 16 / grad.element_size();
  ConvTile forced_tile = ConvTile::M64N64;
  const ForcedKernel forced = forced_conv_kernel(forced_tile);

  // The Hopper path (hopper_plan.h): unit stride, a materialised dy, channels-last dx.
  const HopperCall hc = hopper_backward_call(HopperOp::Dgrad, grad, g, stride, padding, dilation, groups, allow_tf32,
                                             a.has_value(), channels_last);
  if (take_hopper_path(op, hopper_unsupported(hc), forced)) {
    const Tensor dy = channels_last_aligned(grad);
    const Tensor w = packed_filter(weight, FilterLayout::KRSC, 1, 1).t;  // [K, R, S, C]: CUTLASS's dgrad B operand
    HopperConv conv;
    conv.call = hc;
    conv.a = dy.data_ptr();
    conv.b = w.data_ptr();
    conv.d = dx.data_ptr();  // channels-last: [N, H, W, C] dense
    conv.d_sn = dx.stride(0), conv.d_sh = dx.stride(2), conv.d_sw = dx.stride(3);
    conv.sm_count = static_cast<int>(hc.sm_count);
    if (hopper_launch(op, conv, dy, forced)) return dx;
  }
  const bool use_tc = (!is_f32 || allow_tf32) && g.Kg % vec == 0 && forced != ForcedKernel::Simt;

  const DyOperands d = prepare_dy(grad, relu_out, y, a, b, c, mean, use_tc);
  // Tensor cores: filters as [groups, R, S, Cg, Kg], so that a tile row (one input channel
  // of one tap) is contiguous along the reduction over k; repacked once per change of the
  // filter (cached), with a 16-byte aligned base (cp.async reads 16-byte vectors; a plain
  // `.contiguous()` returns a view, storage offset included, when the layout already matches).
  const Tensor w = use_tc ? packed_filter(weight, FilterLayout::GRSCK, groups, 1).t : weight;

  ConvDgradParams p{};
  p.dy = d.dy.data_ptr();
  p.pro = prologue_args(d);
  p.w = w.data_ptr();
  p.dx = dx.data_ptr();
  p.N = g.N;
  p.C = g.C;
  p.H = g.H;
  p.W = g.W;
  p.K = g.K;
  p.R = g.R;
  p.S = g.S;
  p.P = g.P;
  p.Q = g.Q;
  p.Cg = g.Cg;
  p.Kg = g.Kg;
  p.groups = groups;
  p.M_max = M_max;
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[2]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  p.ph_h = axis_phasing(p.stride_h, p.dil_h);
  p.ph_w = axis_phasing(p.stride_w, p.dil_w);
  p.dy_sn = d.dy.stride(0);
  p.dy_sk = d.dy.stride(1);
  p.dy_sp = d.dy.stride(2);
  p.dy_sq = d.dy.stride(3);
  if (!use_tc) {
    p.w_sk = w.stride(0);
    p.w_sc = w.stride(1);
    p.w_sr = w.stride(2);
    p.w_ss = w.stride(3);
  }
  p.dx_sn = dx.stride(0);
  p.dx_sc = dx.stride(1);
  p.dx_sh = dx.stride(2);
  p.dx_sw = dx.stride(3);
  p.vec_out = channels_last && g.Cg % vec == 0 && aligned16(dx);

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = to_dtype(grad.scalar_type());
  const bool pro = a.has_value();
  if (use_tc) {
    ConvTile tile = forced_tile;
    if (forced != ForcedKernel::Tile) {
      // Widest tile that still gives every SM about two CTAs.
      const int64_t sms = props->multiProcessorCount;
      auto ctas = [&](int64_t bm, int64_t bn) { return ceil_div(M_max, bm) * ceil_div(g.Cg, bn) * groups * phases; };
      tile = (g.Cg > 64 && ctas(128, 128) >= 2 * sms) ? ConvTile::M128N128
             : ctas(128, 64) >= 2 * sms              ? ConvTile::M128N64
                                                     : ConvTile::M64N64;
    }
    const int smem = conv_dgrad_tc_smem_bytes(tile, pro);
    TORCH_CHECK(static_cast<size_t>(smem) <= props->sharedMemPerBlockOptin, op, ": the tensor-core kernel needs ", smem,
                " bytes of shared memory per block, this GPU allows ", props->sharedMemPerBlockOptin);
    TORCH_CHECK_VALUE(ceil_div(M_max, tile_rows(tile)) * ceil_div(g.Cg, tile_cols(tile)) < (int64_t(1) << 31), op,
                      ": too many tiles");
    launch_conv_dgrad_tc(p, dt, tile, stream);
  } else {
    TORCH_CHECK_VALUE(ceil_div(M_max, 64) * ceil_div(g.Cg, 64) < (int64_t(1) << 31), op, ": too many tiles");
    launch_conv_dgrad_simt(p, dt, stream);
  }
  return dx;
}

std::tuple<Tensor, Tensor> conv2d_wgrad(const Tensor& grad, const Tensor& x, const OptTensor& relu_out,
                                        const OptTensor& y, const OptTensor& a, const OptTensor& b,
                                        const OptTensor& c, const OptTensor& mean, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, bool need_bias, bool weight_channels_last, bool allow_tf32,
                                        int64_t split_k) {
  const char* op = "resconv::cuda_conv2d_wgrad";
  check_dim(grad, 4, op, "grad", "[N, K, P, Q]");
  check_kernel_dtype(grad, op, "grad");
  check_dim(x, 4, op, "input", "[N, C, H, W]");
  check_same_dtype(x, grad, op, "input", "grad");
  const Geometry g =
      backward_geometry(op, x.sizes(), "input", weight_size, "weight_size", stride, padding, dilation, groups);
  check_grad_and_prologue(op, grad, g, relu_out, y, a, b, c, mean);
  TORCH_CHECK_VALUE(split_k >= 0, op, ": split_k: expected 0 (automatic) or a positive number of splits, got ",
                    split_k);
  const int64_t NPQ = g.N * g.P * g.Q;
  TORCH_CHECK_VALUE(NPQ < (int64_t(1) << 31) - 256, op, ": grad: N*P*Q = ", NPQ, " output pixels exceed 2^31 - 256");
  check_devices(op, grad, x, "input", relu_out, y, a, b, c, mean);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto w_fmt = weight_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor gw = new_output(weight_size, x.options(), w_fmt);
  Tensor gb = need_bias ? new_output({g.K}, x.options()) : at::empty({0}, x.options());
  if (NPQ == 0) {  // empty batch: the sums are empty
    gw.zero_();
    gb.zero_();
    return {gw, gb};
  }

  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, got ", props->major, ".",
              props->minor);
  const bool is_f32 = grad.scalar_type() == at::kFloat;
  const int64_t vec = 16 / grad.element_size();
  ConvTile forced_tile = ConvTile::M64N64;
  const ForcedKernel forced = forced_conv_kernel(forced_tile);

  // The Hopper path (hopper_plan.h): a materialised dy, enough dW tiles to fill the GPU, and
  // no requested split count (that is the hand-written kernels' reproducibility contract).
  const HopperCall hc = hopper_backward_call(HopperOp::Wgrad, grad, g, stride, padding, dilation, groups, allow_tf32,
                                             a.has_value(), true);
  const char* why = split_k > 0 ? "a split count was requested" : hopper_unsupported(hc);
  if (take_hopper_path(op, why, forced)) {
    const Tensor dy = channels_last_aligned(grad);
    const Tensor xin = channels_last_aligned(x);
    // dW as [K, R, S, C] dense: the weight's own layout when it is channels-last, else a copy.
    Tensor krsc = weight_channels_last ? gw : new_output(weight_size, x.options(), at::MemoryFormat::ChannelsLast);
    HopperConv conv;
    conv.call = hc;
    conv.a = dy.data_ptr();
    conv.b = xin.data_ptr();
    conv.d = krsc.data_ptr();
    conv.sm_count = static_cast<int>(hc.sm_count);
    if (hopper_launch(op, conv, dy, forced)) {
      if (!weight_channels_last) gw.copy_(krsc);
      if (need_bias) gb.copy_(dy.sum({0, 2, 3}, false, at::kFloat));  // ATen's fixed-order reduction
      return {gw, gb};
    }
  }
  const bool use_tc = (!is_f32 || allow_tf32) && g.Kg % vec == 0 && (g.Cg % vec == 0 || groups == 1) &&
                      forced != ForcedKernel::Simt;
  const bool pad = use_tc && g.Cg % vec != 0;

  const DyOperands d = prepare_dy(grad, relu_out, y, a, b, c, mean, use_tc);
  const Tensor xin = pad ? pad_channels_last(x, vec) : (use_tc ? channels_last_aligned(x) : x);
  const int64_t Cg = pad ? xin.size(1) : g.Cg;  // padded columns are computed, never stored

  ConvTile tile = forced_tile;
  if (use_tc && forced != ForcedKernel::Tile) {
    tile = g.Kg > 64 && Cg > 64 ? ConvTile::M128N128 : g.Kg > 64 ? ConvTile::M128N64 : ConvTile::M64N64;
    // fp32 with the prologue's staging buffers: the wide tiles exceed some GPUs' shared memory.
    const DType dt = to_dtype(grad.scalar_type());
    if (static_cast<size_t>(conv_wgrad_tc_smem_bytes(tile, dt, a.has_value())) > props->sharedMemPerBlockOptin)
      tile = ConvTile::M64N64;
  }
  const int64_t bm = use_tc ? tile_rows(tile) : 64;
  const int64_t bn = use_tc ? tile_cols(tile) : 64;
  const int64_t tiles = use_tc ? ceil_div(g.Kg, bm) * g.R * g.S * ceil_div(Cg, bn)
                               : ceil_div(g.Kg, bm) * ceil_div(g.R * g.S * Cg, bn);
  TORCH_CHECK_VALUE(tiles < (int64_t(1) << 31), op, ": too many tiles");
  const WgradSplit plan = wgrad_split(NPQ, tiles * groups, 2 * int64_t(props->multiProcessorCount), split_k);

  Tensor part_w, part_b;
  ConvWgradParams p{};
  p.dy = d.dy.data_ptr();
  p.pro = prologue_args(d);
  p.x = xin.data_ptr();
  if (plan.split == 1) {
    p.gw = gw.data_ptr();
    p.gb = need_bias ? gb.data_ptr() : nullptr;
  } else {
    const auto f32 = x.options().dtype(at::kFloat);
    part_w = at::empty({plan.split, g.K, g.R, g.S, g.Cg}, f32);
    part_b = need_bias ? at::empty({plan.split, g.K}, f32) : Tensor();
    p.gw = part_w.data_ptr();
    p.gb = need_bias ? part_b.data_ptr() : nullptr;
  }
  p.N = g.N;
  p.C = xin.size(1);
  p.H = g.H;
  p.W = g.W;
  p.K = g.K;
  p.R = g.R;
  p.S = g.S;
  p.P = g.P;
  p.Q = g.Q;
  p.Cg = Cg;
  p.Kg = g.Kg;
  p.groups = groups;
  p.Cg_out = g.Cg;
  p.NPQ = NPQ;
  p.chunk = plan.chunk;
  p.split = plan.split;
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[2]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  p.dy_sn = d.dy.stride(0);
  p.dy_sk = d.dy.stride(1);
  p.dy_sp = d.dy.stride(2);
  p.dy_sq = d.dy.stride(3);
  p.x_sn = xin.stride(0);
  p.x_sc = xin.stride(1);
  p.x_sh = xin.stride(2);
  p.x_sw = xin.stride(3);
  p.gw_sk = gw.stride(0);
  p.gw_sc = gw.stride(1);
  p.gw_sr = gw.stride(2);
  p.gw_ss = gw.stride(3);

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = to_dtype(grad.scalar_type());
  if (use_tc) {
    const int smem = conv_wgrad_tc_smem_bytes(tile, dt, a.has_value());
    TORCH_CHECK(static_cast<size_t>(smem) <= props->sharedMemPerBlockOptin, op, ": the tensor-core kernel needs ", smem,
                " bytes of shared memory per block, this GPU allows ", props->sharedMemPerBlockOptin);
    launch_conv_wgrad_tc(p, dt, tile, stream);
  } else {
    launch_conv_wgrad_simt(p, dt, stream);
  }
  if (plan.split > 1) {
    launch_wgrad_split_reduce(part_w.data_ptr<float>(), need_bias ? part_b.data_ptr<float>() : nullptr, gw.data_ptr(),
                              need_bias ? gb.data_ptr() : nullptr, dt, plan.split, g.K, g.Cg, g.R, g.S, gw.stride(0),
                              gw.stride(1), gw.stride(2), gw.stride(3), stream);
  }
  return {gw, gb};
}

}  // namespace resconv
