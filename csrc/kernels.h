// The interface between the host launchers (*.cpp, compiled once by the host compiler with
// ATen) and the kernels (*.cu, compiled by nvcc once per GPU architecture). Plain C++ with
// raw pointers and sizes only: no ATen here, so that nvcc parses as little as possible.
//
// Layout conventions (field names as in resconv's docs):
//   x       [N, H, W, C]       dense channels-last input
//   weight  [K, R, S, C/groups] dense ("K R S C"): reduction index (r, s, c), c fastest
//   out     [N, K, P, Q]       any strides given by out_s* (NCHW- or NHWC-dense in practice)
// GEMM view per group: M = N*P*Q rows, K/groups columns, (C/groups)*R*S reduction.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_backward_plan.h"
#include "conv_walk.h"
#include "types.h"

namespace resconv {

// Tile configurations of the tensor-core fprop kernel (BM x BN output tile, 8 warps).
enum class ConvTile : int { M128N128 = 0, M128N64 = 1, M64N64 = 2 };

struct ConvFpropParams {
  const void* x;        // [N, H, W, C] channels-last dense, 16-byte aligned (tensor-core path)
  const void* w;        // [K, R, S, Cg] dense, 16-byte aligned (tensor-core path)
  void* out;            // [N, K, P, Q], strides out_sn/sk/sp/sq (elements)
  const float* scale;   // [K] or nullptr
  const float* shift;   // [K] or nullptr
  const void* res;      // [N, K, P, Q] with out's strides, or nullptr
  float* stat_count;    // [T] rows per statistics partial, or nullptr (no statistics)
  float* stat_mean;     // [T, K] per-partial channel mean of y = scale*acc + shift
  float* stat_m2;       // [T, K] per-partial channel sum of squared deviations of y
  int64_t N, C, H, W;   // input
  int64_t K, R, S;      // filters (K output channels in all groups)
  int64_t P, Q;         // output spatial size
  int64_t Cg, Kg;       // channels per group (input / output)
  int64_t groups;
  int64_t M;            // N*P*Q, < 2^31 (checked by the launcher)
  int64_t Kred;         // Cg*R*S, < 2^31
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;  // pad_h / pad_w: top / left
  int64_t out_sn, out_sk, out_sp, out_sq;
  bool relu;
  // Epilogue stores 16-byte vectors along K: output and residual channels-last dense with
  // 16-byte aligned bases, Kg a multiple of the vector width (decided by the launcher).
  bool vec_out;
  // Tensor-core kernel: the gather's reduction walk with its step, the slice width of
  // kFpropSliceBytes / sizeof(T) elements (tap_geometry; conv_walk.h).
  TapGeometry tap;
};

// Reduction bytes per tile row per pipeline stage of the tensor-core conv kernels.
constexpr int kFpropSliceBytes = 64;

// Tensor-core implicit-GEMM fprop (mma.sync, sm_80+). Needs Cg*sizeof(T) % 16 == 0.
// For DType::Float the products run in TF32.
void launch_conv_fprop_tc(const ConvFpropParams& p, DType dt, ConvTile tile, cudaStream_t stream);
// General SIMT fprop: any Cg, groups, stride, padding, dilation; exact fp32 FMA.
void launch_conv_fprop_simt(const ConvFpropParams& p, DType dt, cudaStream_t stream);
// Dynamic shared memory (bytes) the tensor-core kernel of `tile` needs (for the launcher's check).
int conv_fprop_tc_smem_bytes(ConvTile tile);

// ---- conv backward: dgrad and wgrad (conv_dgrad_kernel.cu, conv_wgrad_kernel.cu) ----------
// The fused dReLU/dBN prologue: the kernels read the incoming gradient g and form, per loaded
// element in fp32, dy = a[k] * (relu_out > 0 ? g : 0) + b[k] * (y - mean[k]) + c[k], rounded
// once to the operand dtype (what a materialised dy tensor would hold); positions outside the
// output (padding taps, rows past the end) contribute 0, not c[k].
struct DyPrologueArgs {
  const void* relu_out;  // [N, K, P, Q] with g's dtype and strides, or nullptr (no ReLU mask)
  const void* y;         // [N, K, P, Q] with g's dtype and strides, or nullptr (no b/c/mean terms)
  const float* a;        // [K]; nullptr: no prologue, g is dy
  const float* b;        // [K] (with y)
  const float* c;        // [K] (with y)
  const float* mean;     // [K] (with y)
};

struct ConvDgradParams {
  const void* dy;       // [N, K, P, Q], strides dy_s* (tensor-core path: channels-last dense, 16-byte aligned)
  DyPrologueArgs pro;   // relu_out / y share dy's strides
  const void* w;        // tensor-core path: [groups, R, S, Cg, Kg] dense repack; SIMT: [K, Cg, R, S], strides w_s*
  void* dx;             // [N, C, H, W], strides dx_s* (written)
  int64_t N, C, H, W;
  int64_t K, R, S, P, Q;
  int64_t Cg, Kg, groups;
  int64_t M_max;        // rows of the largest stride phase (dgrad_max_phase_rows), < 2^31
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;  // pad_h / pad_w: top / left
  AxisPhasing ph_h, ph_w;
  int64_t dy_sn, dy_sk, dy_sp, dy_sq;
  int64_t w_sk, w_sc, w_sr, w_ss;
  int64_t dx_sn, dx_sc, dx_sh, dx_sw;
  bool vec_out;         // dx channels-last dense, 16-byte aligned, Cg a multiple of the vector width
};

struct ConvWgradParams {
  const void* dy;       // [N, K, P, Q], strides dy_s* (tensor-core path: channels-last dense, 16-byte aligned)
  DyPrologueArgs pro;
  const void* x;        // [N, C, H, W], strides x_s* (tensor-core path: channels-last dense, 16-byte aligned)
  // split == 1: dW [K, Cg_out, R, S] of the operand dtype, strides gw_s*, and db [K] (or nullptr);
  // split > 1: fp32 partials [split, K, R, S, Cg_out] and [split, K] (or nullptr).
  void* gw;
  void* gb;
  int64_t N, C, H, W;
  int64_t K, R, S, P, Q;
  int64_t Cg, Kg, groups;
  int64_t Cg_out;       // channels of dW per group: Cg, or fewer when x's channels were zero-padded
  int64_t NPQ;          // reduction length N*P*Q, < 2^31
  int64_t chunk;        // rows of N*P*Q per split (wgrad_split)
  int split;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t dy_sn, dy_sk, dy_sp, dy_sq;
  int64_t x_sn, x_sc, x_sh, x_sw;
  int64_t gw_sk, gw_sc, gw_sr, gw_ss;
};

// Tensor-core dgrad (mma.sync). Needs Kg*sizeof(T) % 16 == 0. Tiles: BM input pixels of one
// stride phase x BN input channels.
void launch_conv_dgrad_tc(const ConvDgradParams& p, DType dt, ConvTile tile, cudaStream_t stream);
// General dgrad: any Kg/Cg, groups, layout (strides); exact fp32 FMA.
void launch_conv_dgrad_simt(const ConvDgradParams& p, DType dt, cudaStream_t stream);
int conv_dgrad_tc_smem_bytes(ConvTile tile, bool prologue);

// Tensor-core wgrad (mma.sync). Needs Kg and Cg multiples of the 16-byte vector width. Tiles:
// BM output channels x BN input channels of one (r, s) tap; grid.z = split.
void launch_conv_wgrad_tc(const ConvWgradParams& p, DType dt, ConvTile tile, cudaStream_t stream);
// General wgrad: any shape and layout; exact fp32 FMA.
void launch_conv_wgrad_simt(const ConvWgradParams& p, DType dt, cudaStream_t stream);
int conv_wgrad_tc_smem_bytes(ConvTile tile, DType dt, bool prologue);
// Second wgrad pass: dW[k, c, r, s] = sum over splits (in order) of partial[sp, k, r, s, c],
// stored in dt through dW's strides; likewise db[k] from [split, K] when both are given.
void launch_wgrad_split_reduce(const float* partial_w, const float* partial_b, void* gw, void* gb, DType dt,
                               int split, int64_t K, int64_t Cg, int64_t R, int64_t S, int64_t gw_sk, int64_t gw_sc,
                               int64_t gw_sr, int64_t gw_ss, cudaStream_t stream);

// ---- BatchNorm statistics ----------------------------------------------------------------
// Reductions over many partials (the finalize's Chan merge, the backward's sums) run as fixed-
// order trees: each level reduces blocks of kTreeChunk partials in parallel (one CTA per block
// and 32 channels) until one block is left, which the final kernel reduces. The shape of the
// tree depends on T only: results are bitwise reproducible.
constexpr int64_t kTreeChunk = 256;
inline int64_t tree_level_rows(int64_t T) { return (T + kTreeChunk - 1) / kTreeChunk; }
// Floats of workspace the levels need: two ping-pong buffers of the first level's size, each
// [T1] counts (with `counts`) + `vectors` x [T1, K]; 0 when T fits one block.
inline int64_t tree_workspace_floats(int64_t T, int64_t K, int vectors, bool counts) {
  if (T <= kTreeChunk) return 0;
  const int64_t T1 = tree_level_rows(T);
  return 2 * ((counts ? T1 : 0) + vectors * T1 * K);
}

// Merge T partials (count[T], mean[T,K], m2[T,K]) with Chan's formula in a fixed order into
// mean, invstd = 1/sqrt(M2/n + eps), var_unbiased = M2/max(n-1, 1), a = gamma*invstd,
// b = beta - mean*a (each [K] fp32). gamma/beta ([K] fp32) may be nullptr (1 / 0). With no
// values at all (an empty batch) the statistics are mean 0, variance 1 (biased and unbiased),
// as nothing is normalised; the caller leaves running statistics untouched, as BatchNorm2d.
// workspace: tree_workspace_floats(T, K, 2, true) floats.
void launch_bn_finalize(const float* count, const float* mean, const float* m2, int64_t T, int64_t K,
                        const float* gamma, const float* beta, double eps, float* out_mean, float* out_invstd,
                        float* out_var, float* out_a, float* out_b, float* workspace, cudaStream_t stream);

// running = (1 - momentum) * running + momentum * batch, in place, for running_mean (if not
// nullptr) and running_var (if not nullptr), both [K] contiguous of dtype dt.
void launch_update_running_stats(void* running_mean, void* running_var, DType dt, const float* mean,
                                 const float* var_unbiased, int64_t K, double momentum, cudaStream_t stream);

// A 4-D tensor [N, K, P, Q] seen as [N, K, L = P*Q] through strides (sn, sk, sl).
struct NKLView {
  const void* data;
  int64_t sn, sk, sl;
};

// Per-channel sum(g) and sum(g * (y - mean)) with g = threshold_backward(grad_out, out) when relu,
// in a fixed order: the first pass writes partials [T, K] (T = ceil(N*L / kReduceRows)), the
// tree levels and a last pass sum them. y / mean optional (y.data == nullptr: only sum(g)).
// All tensors of dtype dt; workspace: tree_workspace_floats(T, K, 2, false) floats.
constexpr int kReduceRows = 256;
void launch_bn_backward_reduce(NKLView grad_out, NKLView out, NKLView y, const float* mean, DType dt,
                               int64_t N, int64_t K, int64_t L, bool relu, float* partial_g,
                               float* partial_gy, float* sum_g, float* sum_gy, float* workspace,
                               cudaStream_t stream);

// ---- elementwise over dense [N, K, P, Q] (NCHW- or NHWC-dense, all operands alike) -------
// out = act((y - center[k]) * a[k] + b[k] + residual); a/b (together), center (with a/b) and
// residual optional. The centre is subtracted first, in fp32: a BatchNorm apply with a large
// common offset in y keeps its digits (folding it into b, y * a + (b - center * a), loses
// log2(|center| / std) bits to the rounding of y * a).
void launch_scale_shift_act(const void* y, const void* residual, void* out, const float* a, const float* b,
                            const float* center, DType dt, int64_t numel, int64_t K, int64_t L, bool channels_last,
                            bool relu, cudaStream_t stream);

// g = grad_out * (out > 0 if relu); grad_residual = g (if not nullptr);
// dy = a[k]*g + b[k]*(y - mean[k]) + c[k] (the last two terms only when y != nullptr).
// dy is of dtype dy_dt (dt or Float), the other tensors of dtype dt.
void launch_bn_backward_dy(const void* grad_out, const void* out, const void* y, void* dy, void* grad_residual,
                           const float* a, const float* b, const float* c, const float* mean, DType dt,
                           DType dy_dt, int64_t numel, int64_t K, int64_t L, bool channels_last, bool relu,
                           cudaStream_t stream);

// ---- build / device probes (elementwise_kernel.cu) -------------------------------------
// nullptr when this build holds a kernel image CUDA device `device` can run, else the CUDA
// error string (e.g. "no kernel image is available for execution on the device"). Queries the
// device; restores the current device.
const char* probe_kernel_image(int device);
// The architectures nvcc compiled for (its __CUDA_ARCH_LIST__, e.g. "800,900").
const char* compiled_arch_list();

}  // namespace resconv
