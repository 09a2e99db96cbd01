// Implicit-GEMM conv2d weight gradient (wgrad) and bias gradient, with the fused dReLU/dBN
// prologue, split-K with a deterministic second pass.
//
//   dW[k, c, r, s] = sum_{n, p, q} dy[n, k, p, q] * x[n, c, h, w],
//                    h = p*stride_h - pad_top + r*dil_h,  w = q*stride_w - pad_left + s*dil_w
//   db[k]          = sum_{n, p, q} dy[n, k, p, q]
//
// GEMM view per group: rows = Kg output channels, columns = (r, s, c) in K R S C order,
// reduction over N*P*Q output pixels. The reduction is long and the output small, so it is
// split into `split` chunks (grid.z, conv_backward_plan.h): with split > 1 each CTA writes an
// fp32 partial tile to its own slice of a [split, K, R, S, Cg] buffer and a second kernel sums
// the slices in split order — no atomics, bitwise reproducible run to run. With split == 1 the
// result is stored directly. db comes from the same dy tiles, summed by the CTAs of the first
// column tile in a fixed order.
//
//  * conv_wgrad_tc_kernel: tensor cores. Both operands are channels-last, so a tile row is
//    one output pixel (npq) with channels contiguous: cp.async 16-byte vectors land in
//    reduction-major tiles [npq][k] and [npq][c], and the mma fragments are read transposed
//    (ldmatrix .trans for 16-bit types; scalar shared loads for TF32, where .trans cannot
//    split 32-bit elements). One (r, s) tap per column tile. The prologue works in place on
//    each thread's own dy vectors, as in dgrad.
//  * conv_wgrad_simt_kernel: any shape / layout (strides), columns (r, s, c) flattened, fp32 FMA.
#include <c10/cuda/CUDAException.h>

#include "conv_backward.cuh"

namespace resconv {
namespace {

constexpr int kThreads = 256;
constexpr int BK = kWgradRows;  // npq rows per pipeline stage

// Output pixel npq -> (n, p, q).
struct Pixel {
  int n, p, q;
};
__device__ __forceinline__ Pixel pixel_of(int npq, int P, int Q) {
  Pixel px;
  const int PQ = P * Q;
  px.n = npq / PQ;
  const int rem = npq - px.n * PQ;
  px.p = rem / Q;
  px.q = rem - px.p * Q;
  return px;
}

// Store the fp32 tile ([BM][ld], shared) of rows k0.. (in-group) for the columns given by
// col_of(col) -> (rs, c) or rs < 0 when the column is past the end. Direct: dW in T through
// its strides; else the split's fp32 partial slice [K, R*S, Cg_out]. Bias: bsum[row] (fp32,
// shared) when db is wanted and this CTA owns it.
template <typename T, int BM, int BN, typename ColOf>
__device__ __forceinline__ void store_dw_tile(const float* tile, int ld, const ConvWgradParams& p, int k0, int grp,
                                              ColOf col_of, const float* bsum) {
  const int tid = threadIdx.x;
  const int Kg = static_cast<int>(p.Kg);
  const int64_t RS = p.R * p.S;
  const int64_t kbase = static_cast<int64_t>(grp) * p.Kg + k0;
  const bool direct = p.split == 1;
  for (int j = tid; j < BM * BN; j += kThreads) {
    const int row = j / BN;  // columns fastest: c is contiguous in the partials (and in K R S C dW)
    const int col = j % BN;
    if (k0 + row >= Kg) continue;
    int rs, c;
    col_of(col, rs, c);
    if (rs < 0) continue;
    const int64_t k = kbase + row;
    const float v = tile[row * ld + col];
    if (direct) {
      const int64_t r = rs / p.S, s = rs - (rs / p.S) * p.S;
      static_cast<T*>(p.gw)[k * p.gw_sk + c * p.gw_sc + r * p.gw_sr + s * p.gw_ss] = from_float<T>(v);
    } else {
      static_cast<float*>(p.gw)[((static_cast<int64_t>(blockIdx.z) * p.K + k) * RS + rs) * p.Cg_out + c] = v;
    }
  }
  if (bsum != nullptr) {
    for (int row = tid; row < BM; row += kThreads) {
      if (k0 + row >= Kg) continue;
      const int64_t k = kbase + row;
      if (direct)
        static_cast<T*>(p.gb)[k] = from_float<T>(bsum[row]);
      else
        static_cast<float*>(p.gb)[static_cast<int64_t>(blockIdx.z) * p.K + k] = bsum[row];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------
template <bool PRO>
constexpr int tc_stages() {
  return PRO ? 3 : 4;
}

template <typename T, int BM, int BN, bool PRO>
struct WgradSmem {
  static constexpr int kStages = tc_stages<PRO>();
  // Row strides (bytes) padded by 8 elements: consecutive rows start 4 (16-bit) or 8 (fp32)
  // banks apart, so the 8 rows of an ldmatrix phase, and the (t, g) pattern of the TF32
  // scalar fragment loads, hit distinct banks.
  static constexpr int kALd = (BM + 8) * static_cast<int>(sizeof(T));
  static constexpr int kBLd = (BN + 8) * static_cast<int>(sizeof(T));
  static constexpr int kATile = BK * kALd;
  static constexpr int kBTile = BK * kBLd;
  static constexpr int kABufs = PRO ? 3 : 1;
  static constexpr int kPipe = kStages * (kABufs * kATile + kBTile);
  static constexpr int kLd = BN + 8;
  static constexpr int kEpi = BM * kLd * 4;
  static constexpr int kMain = kPipe > kEpi ? kPipe : kEpi;
  static constexpr int kBytes = kMain + kThreads * 4;  // + bias partial sums
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool PRO>
__global__ void __launch_bounds__(kThreads, 1) conv_wgrad_tc_kernel(const ConvWgradParams p) {
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "8 warps");
  constexpr int WM = BM / WARPS_M;
  constexpr int WN = BN / WARPS_N;
  constexpr int MT = WM / 16;
  constexpr int NT = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "fragments are loaded 16 rows / columns at a time");
  constexpr int VEC = 16 / sizeof(T);
  using Smem = WgradSmem<T, BM, BN, PRO>;
  constexpr int STAGES = Smem::kStages;
  // Loader: a tile row of BM (BN) channels is AV (BV) vectors; 256 threads cover ARP (BRP) rows per pass.
  constexpr int AV = BM / VEC, BV = BN / VEC;
  static_assert(kThreads % AV == 0 && kThreads % BV == 0, "whole rows per pass");
  constexpr int ARP = kThreads / AV, BRP = kThreads / BV;
  static_assert(BK % ARP == 0 && BK % BRP == 0, "whole passes per stage");
  constexpr int A_PASSES = BK / ARP, B_PASSES = BK / BRP;
  static_assert(STAGES * A_PASSES <= 32, "validity bits fit one word");
  static_assert(kThreads % BM == 0, "bias: whole row groups");

  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* const a_buf = smem;  // [STAGES][BK][kALd] dy (g), then (PRO) relu_out, y
  [[maybe_unused]] unsigned char* const r_buf = smem + STAGES * Smem::kATile;
  [[maybe_unused]] unsigned char* const y_buf = smem + 2 * STAGES * Smem::kATile;
  unsigned char* const b_buf = smem + Smem::kABufs * STAGES * Smem::kATile;  // [STAGES][BK][kBLd] x
  float* const bias_part = reinterpret_cast<float*>(smem + Smem::kMain);   // [kThreads]
  const uint32_t sA = smem_u32(a_buf);
  const uint32_t sB = smem_u32(b_buf);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / WARPS_N;
  const int warp_n = warp % WARPS_N;

  // Column tiles vary fastest: CTAs resident together read the same dy rows.
  const int n_cb = static_cast<int>((p.Cg + BN - 1) / BN);
  const int n_tiles = static_cast<int>(p.R * p.S) * n_cb;
  const int m_tile = static_cast<int>(blockIdx.x / n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int rs = n_tile / n_cb;
  const int c0 = (n_tile - rs * n_cb) * BN;
  const int r = rs / static_cast<int>(p.S);
  const int s = rs - r * static_cast<int>(p.S);
  const int grp = static_cast<int>(blockIdx.y);
  const int k0 = m_tile * BM;
  const int start = static_cast<int>(blockIdx.z * p.chunk);
  const int64_t end64 = (blockIdx.z + 1) * p.chunk;
  const int end = static_cast<int>(end64 < p.NPQ ? end64 : p.NPQ);
  const bool want_bias = p.gb != nullptr && n_tile == 0;

  const T* dy = static_cast<const T*>(p.dy);
  [[maybe_unused]] const T* relu_out = static_cast<const T*>(p.pro.relu_out);
  [[maybe_unused]] const T* yin = static_cast<const T*>(p.pro.y);
  const T* x = static_cast<const T*>(p.x);
  const int P = static_cast<int>(p.P), Q = static_cast<int>(p.Q);
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);

  const int a_v = tid % AV, a_row = tid / AV;
  const int a_k = k0 + a_v * VEC;  // in-group output channel of this thread's dy vectors
  const bool a_kok = a_k < p.Kg;   // Kg % VEC == 0: the whole vector
  const int64_t a_chan = static_cast<int64_t>(grp) * p.Kg + a_k;
  const int b_v = tid % BV, b_row = tid / BV;
  const int b_c = c0 + b_v * VEC;
  const bool b_cok = b_c < p.Cg;
  const int64_t b_chan = static_cast<int64_t>(grp) * p.Cg + b_c;
  const int dh = r * p.dil_h - p.pad_h;
  const int dw = s * p.dil_w - p.pad_w;

  [[maybe_unused]] uint32_t valid_bits = 0;
  // Each thread's rows of the reduction as (n, p, q), advanced by BK pixels per slice without
  // division (conv_walk.h); loads are issued in slice order.
  const PixelGeometry pgeo = pixel_geometry(P, Q, BK);
  int a_npq[A_PASSES], b_npq[B_PASSES];
  PixelWalk a_px[A_PASSES], b_px[B_PASSES];
#pragma unroll
  for (int i = 0; i < A_PASSES; ++i) {
    a_npq[i] = start + a_row + i * ARP;
    a_px[i] = pixel_walk_at(a_npq[i], pgeo);
  }
#pragma unroll
  for (int i = 0; i < B_PASSES; ++i) {
    b_npq[i] = start + b_row + i * BRP;
    b_px[i] = pixel_walk_at(b_npq[i], pgeo);
  }
  auto load_stage = [&](int slot) {
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) {
      const int row = a_row + i * ARP;
      const bool ok = a_kok && a_npq[i] < end;
      const PixelWalk px = a_px[i];
      a_npq[i] += BK;
      pixel_walk_advance(a_px[i], pgeo);
      int64_t off = 0;
      if (ok) off = px.n * p.dy_sn + px.p * p.dy_sp + px.q * p.dy_sq + a_chan;
      const uint32_t dst = slot * Smem::kATile + row * Smem::kALd + a_v * 16;
      cp_async_16(sA + dst, dy + off, ok);
      if constexpr (PRO) {
        if (relu_out != nullptr) cp_async_16(smem_u32(r_buf) + dst, relu_out + off, ok);
        if (yin != nullptr) cp_async_16(smem_u32(y_buf) + dst, yin + off, ok);
        const uint32_t bit = 1u << (slot * A_PASSES + i);
        valid_bits = ok ? (valid_bits | bit) : (valid_bits & ~bit);
      }
    }
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const int row = b_row + i * BRP;
      bool ok = b_cok && b_npq[i] < end;
      const PixelWalk px = b_px[i];
      b_npq[i] += BK;
      pixel_walk_advance(b_px[i], pgeo);
      int64_t off = 0;
      if (ok) {
        const int ih = px.p * p.stride_h + dh;
        const int iw = px.q * p.stride_w + dw;
        ok = ih >= 0 && ih < H && iw >= 0 && iw < W;
        off = px.n * p.x_sn + static_cast<int64_t>(ih) * p.x_sh + static_cast<int64_t>(iw) * p.x_sw + b_chan;
      }
      cp_async_16(sB + slot * Smem::kBTile + row * Smem::kBLd + b_v * 16, ok ? x + off : x, ok);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  float bacc = 0.f;  // bias: channel tid % BM over rows (tid / BM) + G*i of each stage
  constexpr int G = kThreads / BM;

  const int KT = (end - start + BK - 1) / BK;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < KT) load_stage(st);
    cp_async_commit();
  }

  const int g = lane >> 2;
  const int t4 = lane & 3;
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    const int slot = kt % STAGES;
    if constexpr (PRO) {
#pragma unroll
      for (int i = 0; i < A_PASSES; ++i) {
        const int off = slot * Smem::kATile + (a_row + i * ARP) * Smem::kALd + a_v * 16;
        prologue_vector<T>(p.pro, a_buf + off, r_buf + off, y_buf + off, a_chan,
                           (valid_bits >> (slot * A_PASSES + i)) & 1u);
      }
    }
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_stage(next % STAGES);
    cp_async_commit();

    if (want_bias) {  // the dy operand exactly as multiplied (rows past the end are zeros)
      const T* at = reinterpret_cast<const T*>(a_buf + slot * Smem::kATile);
      for (int row = tid / BM; row < BK; row += G) bacc += to_float(at[row * (Smem::kALd / sizeof(T)) + tid % BM]);
    }
    if constexpr (sizeof(T) == 2) {
      const uint32_t a_stage = sA + slot * Smem::kATile;
      const uint32_t b_stage = sB + slot * Smem::kBTile;
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[MT][4];
        uint32_t bf[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // matrices (m 0-7 | 8-15) x (npq 0-7 | 8-15), stored npq-major: transposed loads
          const int row = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int col = warp_m * WM + mt * 16 + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(af[mt], a_stage + row * Smem::kALd + col * 2);
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          // matrices (npq 0-7, n 0-7), (npq 8-15, n 0-7), (npq 0-7, n 8-15), (npq 8-15, n 8-15)
          const int row = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int col = warp_n * WN + np * 16 + ((lane >> 4) << 3);
          uint32_t r4[4];
          ldmatrix_x4_trans(r4, b_stage + row * Smem::kBLd + col * 2);
          bf[2 * np][0] = r4[0];
          bf[2 * np][1] = r4[1];
          bf[2 * np + 1][0] = r4[2];
          bf[2 * np + 1][1] = r4[3];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[mt][nt], af[mt], bf[nt]);
      }
    } else {
      // TF32 m16n8k8: A (m g | g+8, k t | t+4), B (k t | t+4, n g), read element by element.
      const float* as = reinterpret_cast<const float*>(a_buf + slot * Smem::kATile);
      const float* bs = reinterpret_cast<const float*>(b_buf + slot * Smem::kBTile);
      constexpr int ALD = Smem::kALd / 4, BLD = Smem::kBLd / 4;
#pragma unroll
      for (int ks = 0; ks < BK / 8; ++ks) {
        const int kr = ks * 8 + t4;
        uint32_t af[MT][4];
        uint32_t bf[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = warp_m * WM + mt * 16 + g;
          af[mt][0] = to_tf32(__float_as_uint(as[kr * ALD + m]));
          af[mt][1] = to_tf32(__float_as_uint(as[kr * ALD + m + 8]));
          af[mt][2] = to_tf32(__float_as_uint(as[(kr + 4) * ALD + m]));
          af[mt][3] = to_tf32(__float_as_uint(as[(kr + 4) * ALD + m + 8]));
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int n = warp_n * WN + nt * 8 + g;
          bf[nt][0] = to_tf32(__float_as_uint(bs[kr * BLD + n]));
          bf[nt][1] = to_tf32(__float_as_uint(bs[(kr + 4) * BLD + n]));
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[mt][nt], af[mt], bf[nt]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  float* tile = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = warp_n * WN + nt * 8 + 2 * t4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int row = warp_m * WM + mt * 16 + g;
      *reinterpret_cast<float2*>(tile + row * Smem::kLd + col) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(tile + (row + 8) * Smem::kLd + col) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  if (want_bias) bias_part[tid] = bacc;
  __syncthreads();
  if (want_bias && tid < BM) {  // fixed order over the row groups
    float sum = 0.f;
    for (int gi = 0; gi < G; ++gi) sum += bias_part[gi * BM + tid];
    bias_part[tid] = sum;  // only thread tid reads and writes entries gi*BM + tid
  }
  __syncthreads();
  const int cg_out = static_cast<int>(p.Cg_out);
  store_dw_tile<T, BM, BN>(
      tile, Smem::kLd, p, k0, grp,
      [=](int col, int& rs_out, int& c) {
        c = c0 + col;
        rs_out = c < cg_out ? rs : -1;
      },
      want_bias ? bias_part : nullptr);
}

// ---------------------------------------------------------------------------------------
// SIMT kernel: 64 x 64 tile (output channels x flattened (r, s, c)), 16 rows of N*P*Q per step.
// ---------------------------------------------------------------------------------------
constexpr int kSimtBM = 64;
constexpr int kSimtBN = 64;
constexpr int kSimtBK = 16;
static_assert(kWgradRows % kSimtBK == 0, "split chunks hold whole SIMT steps");

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_wgrad_simt_kernel(const ConvWgradParams p) {
  constexpr int BM = kSimtBM, BN = kSimtBN, SK = kSimtBK;
  constexpr int LDA = BM + 1;
  constexpr int LDB = BN + 1;
  constexpr int LD = BN + 8;
  __shared__ float sA[SK * LDA];
  __shared__ float sB[SK * LDB];
  __shared__ __align__(16) float tile[BM * LD];
  __shared__ float bsum[BM];

  const int tid = threadIdx.x;
  const int64_t cols_total = p.R * p.S * p.Cg;
  const int n_tiles = static_cast<int>((cols_total + BN - 1) / BN);
  const int m_tile = static_cast<int>(blockIdx.x / n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int grp = static_cast<int>(blockIdx.y);
  const int k0 = m_tile * BM;
  const int n0 = n_tile * BN;
  const int start = static_cast<int>(blockIdx.z * p.chunk);
  const int64_t end64 = (blockIdx.z + 1) * p.chunk;
  const int end = static_cast<int>(end64 < p.NPQ ? end64 : p.NPQ);
  const bool want_bias = p.gb != nullptr && n_tile == 0;

  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const int P = static_cast<int>(p.P), Q = static_cast<int>(p.Q);
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int Cg = static_cast<int>(p.Cg), S = static_cast<int>(p.S);

  // Loads: npq fastest across threads; rows / columns lrow + 16 * i.
  const int lk = tid % SK;
  const int lrow = tid / SK;
  int64_t a_chan[4];
  bool a_ok[4];
  int64_t b_chan[4];
  int b_dh[4], b_dw[4];
  bool b_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = k0 + lrow + 16 * i;
    a_ok[i] = k < p.Kg;
    a_chan[i] = static_cast<int64_t>(grp) * p.Kg + (a_ok[i] ? k : 0);
    const int col = n0 + lrow + 16 * i;
    b_ok[i] = col < cols_total;
    const int cc = b_ok[i] ? col : 0;
    const int rs = cc / Cg;
    const int c = cc - rs * Cg;
    const int r = rs / S;
    const int s = rs - r * S;
    b_chan[i] = (static_cast<int64_t>(grp) * p.Cg + c) * p.x_sc;
    b_dh[i] = r * p.dil_h - p.pad_h;
    b_dw[i] = s * p.dil_w - p.pad_w;
  }
  const int tx = tid % 16;
  const int ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  float bacc = 0.f;

  for (int r0 = start; r0 < end; r0 += SK) {
    const int npq = r0 + lk;
    const bool row_ok = npq < end;
    const Pixel px = pixel_of(row_ok ? npq : start, P, Q);
    const int64_t dy_pix = px.n * p.dy_sn + px.p * p.dy_sp + px.q * p.dy_sq;
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      av[i] = (row_ok && a_ok[i]) ? load_dy<T>(dy, p.pro, dy_pix + a_chan[i] * p.dy_sk, a_chan[i]) : 0.f;
      const int ih = px.p * p.stride_h + b_dh[i];
      const int iw = px.q * p.stride_w + b_dw[i];
      const bool ok = row_ok && b_ok[i] && ih >= 0 && ih < H && iw >= 0 && iw < W;
      bv[i] = ok ? to_float(x[px.n * p.x_sn + static_cast<int64_t>(ih) * p.x_sh + static_cast<int64_t>(iw) * p.x_sw +
                              b_chan[i]])
                 : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sA[lk * LDA + lrow + 16 * i] = av[i];
      sB[lk * LDB + lrow + 16 * i] = bv[i];
    }
    __syncthreads();
    if (want_bias && tid < BM) {
#pragma unroll
      for (int kq = 0; kq < SK; ++kq) bacc += sA[kq * LDA + tid];
    }
#pragma unroll
    for (int kq = 0; kq < SK; ++kq) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[kq * LDA + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sB[kq * LDB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) tile[(ty + 16 * i) * LD + tx + 16 * j] = acc[i][j];
  if (want_bias && tid < BM) bsum[tid] = bacc;
  __syncthreads();
  const int cg_out = static_cast<int>(p.Cg_out);
  store_dw_tile<T, BM, BN>(
      tile, LD, p, k0, grp,
      [=](int col, int& rs_out, int& c) {
        const int cc = n0 + col;
        rs_out = cc / Cg;
        c = cc - rs_out * Cg;
        if (cc >= cols_total || c >= cg_out) rs_out = -1;
      },
      want_bias ? bsum : nullptr);
}

// ---------------------------------------------------------------------------------------
// Second pass: fixed-order sum over the splits.
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    wgrad_split_reduce_kernel(const float* __restrict__ part_w, const float* __restrict__ part_b, T* __restrict__ gw,
                              T* __restrict__ gb, int split, int64_t K, int64_t Cg, int64_t R, int64_t S,
                              int64_t sk, int64_t sc, int64_t sr, int64_t ss) {
  const int64_t L = K * R * S * Cg;  // partial index order (k, r, s, c)
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx < L) {
    float acc = 0.f;
    for (int sp = 0; sp < split; ++sp) acc += part_w[sp * L + idx];
    const int64_t c = idx % Cg;
    int64_t t = idx / Cg;
    const int64_t s = t % S;
    t /= S;
    const int64_t r = t % R;
    const int64_t k = t / R;
    gw[k * sk + c * sc + r * sr + s * ss] = from_float<T>(acc);
  } else if (part_b != nullptr && idx - L < K) {
    const int64_t k = idx - L;
    float acc = 0.f;
    for (int sp = 0; sp < split; ++sp) acc += part_b[sp * K + k];
    gb[k] = from_float<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool PRO>
void launch_tc(const ConvWgradParams& p, cudaStream_t stream) {
  using Smem = WgradSmem<T, BM, BN, PRO>;
  auto kernel = conv_wgrad_tc_kernel<T, BM, BN, WARPS_M, WARPS_N, PRO>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes));
  const int64_t tiles = (p.Kg + BM - 1) / BM * (p.R * p.S * ((p.Cg + BN - 1) / BN));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.groups), static_cast<unsigned>(p.split));
  kernel<<<grid, kThreads, Smem::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool PRO>
void launch_tc_tile(const ConvWgradParams& p, ConvTile tile, cudaStream_t stream) {
  switch (tile) {
    case ConvTile::M128N128:
      launch_tc<T, 128, 128, 2, 4, PRO>(p, stream);  // warp tile 64 x 32
      break;
    case ConvTile::M128N64:
      launch_tc<T, 128, 64, 4, 2, PRO>(p, stream);  // warp tile 32 x 32
      break;
    case ConvTile::M64N64:
      launch_tc<T, 64, 64, 2, 4, PRO>(p, stream);  // warp tile 32 x 16
      break;
  }
}

template <typename T>
void launch_tc_typed(const ConvWgradParams& p, ConvTile tile, cudaStream_t stream) {
  if (p.pro.a != nullptr)
    launch_tc_tile<T, true>(p, tile, stream);
  else
    launch_tc_tile<T, false>(p, tile, stream);
}

template <typename T>
void launch_simt(const ConvWgradParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.Kg + kSimtBM - 1) / kSimtBM * ((p.R * p.S * p.Cg + kSimtBN - 1) / kSimtBN);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.groups), static_cast<unsigned>(p.split));
  conv_wgrad_simt_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
int smem_bytes(ConvTile tile, bool prologue) {
  switch (tile) {
    case ConvTile::M128N128:
      return prologue ? WgradSmem<T, 128, 128, true>::kBytes : WgradSmem<T, 128, 128, false>::kBytes;
    case ConvTile::M128N64:
      return prologue ? WgradSmem<T, 128, 64, true>::kBytes : WgradSmem<T, 128, 64, false>::kBytes;
    case ConvTile::M64N64:
      return prologue ? WgradSmem<T, 64, 64, true>::kBytes : WgradSmem<T, 64, 64, false>::kBytes;
  }
  return 0;
}

}  // namespace

int conv_wgrad_tc_smem_bytes(ConvTile tile, DType dt, bool prologue) {
  return dt == DType::Float ? smem_bytes<float>(tile, prologue) : smem_bytes<__half>(tile, prologue);
}

void launch_conv_wgrad_tc(const ConvWgradParams& p, DType dt, ConvTile tile, cudaStream_t stream) {
  switch (dt) {
    case DType::Half:
      launch_tc_typed<__half>(p, tile, stream);
      break;
    case DType::BFloat16:
      launch_tc_typed<__nv_bfloat16>(p, tile, stream);
      break;
    case DType::Float:
      launch_tc_typed<float>(p, tile, stream);
      break;
    default:
      TORCH_CHECK(false, "conv wgrad (tensor cores): unsupported dtype");
  }
}

void launch_conv_wgrad_simt(const ConvWgradParams& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::Half:
      launch_simt<__half>(p, stream);
      break;
    case DType::BFloat16:
      launch_simt<__nv_bfloat16>(p, stream);
      break;
    case DType::Float:
      launch_simt<float>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "conv wgrad (SIMT): unsupported dtype");
  }
}

void launch_wgrad_split_reduce(const float* partial_w, const float* partial_b, void* gw, void* gb, DType dt, int split,
                               int64_t K, int64_t Cg, int64_t R, int64_t S, int64_t gw_sk, int64_t gw_sc,
                               int64_t gw_sr, int64_t gw_ss, cudaStream_t stream) {
  const int64_t total = K * R * S * Cg + (partial_b != nullptr ? K : 0);
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "conv wgrad split reduction: too many elements");
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (dt) {
    case DType::Half:
      wgrad_split_reduce_kernel<__half><<<grid, kThreads, 0, stream>>>(
          partial_w, partial_b, static_cast<__half*>(gw), static_cast<__half*>(gb), split, K, Cg, R, S, gw_sk, gw_sc,
          gw_sr, gw_ss);
      break;
    case DType::BFloat16:
      wgrad_split_reduce_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          partial_w, partial_b, static_cast<__nv_bfloat16*>(gw), static_cast<__nv_bfloat16*>(gb), split, K, Cg, R, S,
          gw_sk, gw_sc, gw_sr, gw_ss);
      break;
    case DType::Float:
      wgrad_split_reduce_kernel<float><<<grid, kThreads, 0, stream>>>(partial_w, partial_b, static_cast<float*>(gw),
                                                                      static_cast<float*>(gb), split, K, Cg, R, S,
                                                                      gw_sk, gw_sc, gw_sr, gw_ss);
      break;
    default:
      TORCH_CHECK(false, "conv wgrad split reduction: unsupported dtype");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace resconv
