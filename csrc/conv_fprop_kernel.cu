// Implicit-GEMM conv2d forward (fprop) with the fused epilogue.
//
// GEMM view per group: M = N*P*Q output pixels (rows), Kg output channels (columns),
// Kred = Cg*R*S reduction, ordered (r, s, c) with c fastest, matching the K R S C filters,
// so the filter tile is a plain row-major [Kg, Kred] block and the input tile is gathered
// row by row from the NHWC input (no im2col buffer).
//
// Two kernels share one epilogue:
//  * conv_fprop_tc_kernel: tensor cores (mma.sync m16n8k16 fp16/bf16, m16n8k8 TF32), a
//    4-stage cp.async pipeline of 64-byte reduction slices, ldmatrix fragment loads. Needs
//    Cg * sizeof(T) to be a multiple of 16 bytes, so every 16-byte vector of the gather lies
//    in one (r, s) tap and is aligned.
//  * conv_fprop_simt_kernel: any shape (groups, odd channel counts), plain fp32 FMA
//    (IEEE float32 when TF32 is not allowed).
//
// Epilogue (both kernels): the fp32 accumulator tile goes to shared memory as
// y = acc * scale[k] + shift[k]; from there (a) BatchNorm partials: for each channel and
// each kStatsTileRows-row segment, count, mean and M2 (two passes over the segment, the sum
// relative to its first row, never E[y^2] - E[y]^2); (b) out = relu(y + residual) rounded once to T and stored through the
// output's strides (16-byte vectors along K when the output is channels-last).
#include <c10/cuda/CUDAException.h>

#include "conv_walk.h"
#include "device_utils.cuh"
#include "kernels.h"

namespace resconv {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------
// Shared epilogue
// ---------------------------------------------------------------------------------------
// Precondition: `tile` ([BM][ld] fp32, shared) holds y for rows m0.. and columns n0.. of
// group grp; row_off[r] (shared) is the element offset of output row m0 + r without the
// channel term, or -1 past M. Called by all kThreads threads after a __syncthreads().
template <typename T, int BM, int BN>
__device__ __forceinline__ void epilogue_from_smem(const float* tile, int ld, const int64_t* row_off,
                                                   const ConvFpropParams& p, int m0, int n0, int grp,
                                                   int n_tile) {
  const int tid = threadIdx.x;
  const int M = static_cast<int>(p.M);
  const int Kg = static_cast<int>(p.Kg);
  const int64_t k_base = static_cast<int64_t>(grp) * p.Kg;

  if (p.stat_mean != nullptr) {
    static_assert(BM % kStatsTileRows == 0, "statistics segments must tile BM");
    constexpr int kSegs = BM / kStatsTileRows;
    for (int j = tid; j < BN * kSegs; j += kThreads) {
      const int col = j % BN;
      const int seg = j / BN;
      const int row0 = seg * kStatsTileRows;
      const int rows = min(kStatsTileRows, M - (m0 + row0));
      if (n0 + col >= Kg || rows <= 0) continue;
      // Summed relative to the segment's first row (a pivot): a large common offset in y
      // then does not round the sum away.
      const float pivot = tile[row0 * ld + col];
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) sum += tile[(row0 + r) * ld + col] - pivot;
      const float mean = pivot + sum / static_cast<float>(rows);
      float m2 = 0.f;
      for (int r = 0; r < rows; ++r) {
        const float d = tile[(row0 + r) * ld + col] - mean;
        m2 += d * d;
      }
      const int64_t t = m0 / kStatsTileRows + seg;
      const int64_t k = k_base + n0 + col;
      p.stat_mean[t * p.K + k] = mean;
      p.stat_m2[t * p.K + k] = m2;
    }
    if (n_tile == 0 && grp == 0 && tid < kSegs) {
      const int rows = min(kStatsTileRows, M - (m0 + tid * kStatsTileRows));
      if (rows > 0) p.stat_count[m0 / kStatsTileRows + tid] = static_cast<float>(rows);
    }
  }

  T* out = static_cast<T*>(p.out);
  const T* res = static_cast<const T*>(p.res);
  if (p.vec_out) {
    // Channels-last output, Kg % V == 0: a 16-byte chunk is all inside or all outside Kg.
    constexpr int V = 16 / sizeof(T);
    constexpr int kChunks = BN / V;
    for (int j = tid; j < BM * kChunks; j += kThreads) {
      const int row = j / kChunks;
      const int col = (j % kChunks) * V;
      const int64_t off = row_off[row];
      if (off < 0 || n0 + col >= Kg) continue;
      const int64_t o = off + k_base + n0 + col;  // channel stride is 1
      float v[V];
#pragma unroll
      for (int e = 0; e < V; e += 4) {
        const float4 f = *reinterpret_cast<const float4*>(tile + row * ld + col + e);
        v[e] = f.x;
        v[e + 1] = f.y;
        v[e + 2] = f.z;
        v[e + 3] = f.w;
      }
      if (res != nullptr) {
        const Vec<T, V> r = *reinterpret_cast<const Vec<T, V>*>(res + o);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] += to_float(r.v[e]);
      }
      Vec<T, V> w;
#pragma unroll
      for (int e = 0; e < V; ++e) w.v[e] = from_float<T>(p.relu ? relu_keep_nan(v[e]) : v[e]);
      *reinterpret_cast<Vec<T, V>*>(out + o) = w;
    }
  } else {
    // Scalar stores; consecutive threads walk the output's fastest dimension.
    const bool k_fastest = p.out_sk == 1;
    for (int j = tid; j < BM * BN; j += kThreads) {
      const int row = k_fastest ? j / BN : j % BM;
      const int col = k_fastest ? j % BN : j / BM;
      const int64_t off = row_off[row];
      if (off < 0 || n0 + col >= Kg) continue;
      const int64_t o = off + (k_base + n0 + col) * p.out_sk;
      float v = tile[row * ld + col];
      if (res != nullptr) v += to_float(res[o]);
      out[o] = from_float<T>(p.relu ? relu_keep_nan(v) : v);
    }
  }
}

// Output offset of row m (without the channel term), -1 past M.
__device__ __forceinline__ int64_t output_row_offset(const ConvFpropParams& p, int m) {
  if (m >= p.M) return -1;
  const int PQ = static_cast<int>(p.P * p.Q);
  const int Q = static_cast<int>(p.Q);
  const int n = m / PQ;
  const int pq = m - n * PQ;
  const int pp = pq / Q;
  const int q = pq - pp * Q;
  return n * p.out_sn + pp * p.out_sp + q * p.out_sq;
}

// Scale/shift of output channel column `col` of the tile (1 / 0 outside Kg or when absent).
__device__ __forceinline__ void channel_affine(const ConvFpropParams& p, int64_t k_base, int kl, float& sc,
                                               float& sh) {
  sc = 1.f;
  sh = 0.f;
  if (kl < p.Kg) {
    if (p.scale != nullptr) sc = p.scale[k_base + kl];
    if (p.shift != nullptr) sh = p.shift[k_base + kl];
  }
}

// Row geometry of one output pixel for the input gather.
struct RowGather {
  int64_t base;  // offset of x[n, 0, 0, grp*Cg]
  int64_t pix;   // base + (ih0 * W + iw0) * C: the receptive field's corner (may lie in the padding)
  int ih0, iw0;  // top-left input coordinate of the receptive field
  bool ok;       // m < M
};

__device__ __forceinline__ RowGather row_gather(const ConvFpropParams& p, int m, int grp) {
  RowGather g;
  g.ok = m < p.M;
  const int mm = g.ok ? m : 0;
  const int PQ = static_cast<int>(p.P * p.Q);
  const int Q = static_cast<int>(p.Q);
  const int n = mm / PQ;
  const int pq = mm - n * PQ;
  const int pp = pq / Q;
  const int q = pq - pp * Q;
  g.ih0 = pp * p.stride_h - p.pad_h;
  g.iw0 = q * p.stride_w - p.pad_w;
  g.base = static_cast<int64_t>(n) * p.H * p.W * p.C + static_cast<int64_t>(grp) * p.Cg;
  g.pix = g.base + (static_cast<int64_t>(g.ih0) * p.W + g.iw0) * p.C;
  return g;
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------
constexpr int kStages = 4;
constexpr int kSliceBytes = kFpropSliceBytes;  // reduction bytes per tile row per pipeline stage
constexpr int kRowStride = 80;    // padded row: 8 consecutive rows start 20 words apart, so the
                                  // 8 row addresses of each ldmatrix phase hit disjoint banks

template <int BM, int BN>
struct TcSmem {
  static constexpr int kPipe = kStages * (BM + BN) * kRowStride;
  // Epilogue tile row stride: BN + 8 floats puts rows g and g+1 eight banks apart, so the
  // float2 fragment stores of a half-warp (rows g..g+3, 8 floats each) are conflict-free.
  static constexpr int kLd = BN + 8;
  static constexpr int kEpi = BM * kLd * 4;
  static constexpr int kMain = kPipe > kEpi ? kPipe : kEpi;
  static constexpr int kBytes = kMain + BM * 8;  // + int64 row offsets
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(kThreads) conv_fprop_tc_kernel(const ConvFpropParams p) {
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "8 warps");
  constexpr int WM = BM / WARPS_M;  // warp tile
  constexpr int WN = BN / WARPS_N;
  constexpr int MT = WM / 16;  // mma tiles per warp
  constexpr int NT = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "B fragments are loaded 16 columns at a time");
  constexpr int VEC = 16 / sizeof(T);           // elements per 16-byte vector
  constexpr int BKE = kSliceBytes / sizeof(T);  // reduction elements per stage
  // 256 threads load 64 rows x 4 vectors per pass.
  static_assert(BM % 64 == 0 && BN % 64 == 0, "loader passes of 64 rows");
  constexpr int A_PASSES = BM / 64;
  constexpr int B_PASSES = BN / 64;
  using Smem = TcSmem<BM, BN>;

  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t sA = smem_u32(smem);                             // [kStages][BM][kRowStride]
  const uint32_t sB = sA + kStages * BM * kRowStride;             // [kStages][BN][kRowStride]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / WARPS_N;
  const int warp_n = warp % WARPS_N;

  // N tiles vary fastest: CTAs resident together read the same input rows (L2 reuse).
  const int n_tiles = static_cast<int>((p.Kg + BN - 1) / BN);
  const int m_tile = static_cast<int>(blockIdx.x / n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int grp = blockIdx.z;
  const int m0 = m_tile * BM;
  const int n0 = n_tile * BN;

  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const int Kred = static_cast<int>(p.Kred);
  const int R = static_cast<int>(p.R);
  const int H = static_cast<int>(p.H);
  const int W = static_cast<int>(p.W);

  // Loader assignment: thread -> 16-byte vector `vcol` of rows lrow + 64 * pass.
  const int vcol = tid & 3;
  const int lrow = tid >> 2;
  RowGather arow[A_PASSES];
#pragma unroll
  for (int i = 0; i < A_PASSES; ++i) arow[i] = row_gather(p, m0 + lrow + 64 * i, grp);
  int64_t brow[B_PASSES];
  bool brow_ok[B_PASSES];
#pragma unroll
  for (int i = 0; i < B_PASSES; ++i) {
    const int kl = n0 + lrow + 64 * i;
    brow_ok[i] = kl < p.Kg;
    brow[i] = (static_cast<int64_t>(grp) * p.Kg + (brow_ok[i] ? kl : 0)) * p.Kred;
  }

  // This thread's vector of the reduction: its index kf (the filter rows are contiguous along
  // it) and its (r, s, c) with the tap's input offset, advanced slice by slice without division
  // (conv_walk.h); loads are issued in slice order, so the walk is always at the next slice.
  int kf = vcol * VEC;
  TapWalk tap = tap_walk_at(kf, p.tap);
  auto load_stage = [&](int stage) {
    const bool k_ok = tap.r < R;  // kf < Kred: c < Cg and s < S always hold
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) {
      const int ih = arow[i].ih0 + tap.dh;
      const int iw = arow[i].iw0 + tap.dw;
      const bool ok = arow[i].ok && k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
      const T* src = ok ? x + (arow[i].pix + tap.off + tap.c) : x;
      cp_async_16(sA + (stage * BM + lrow + 64 * i) * kRowStride + vcol * 16, src, ok);
    }
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const bool ok = brow_ok[i] && k_ok;
      const T* src = ok ? w + brow[i] + kf : w;
      cp_async_16(sB + (stage * BN + lrow + 64 * i) * kRowStride + vcol * 16, src, ok);
    }
    kf += BKE;
    tap_walk_advance(tap, p.tap);
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int KT = (Kred + BKE - 1) / BKE;
  // Prologue: stages 0 .. kStages-2 in flight, one commit group each (possibly empty).
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < KT) load_stage(st);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    // Groups committed so far: kStages - 1 + kt, the newest kStages - 2 of them for slices
    // after kt; so at most kStages - 2 pending means slice kt has landed (for this thread).
    cp_async_wait<kStages - 2>();
    // Everyone's copies of slice kt are visible, and everyone has finished computing on
    // slice kt - 1, whose stage the load below overwrites.
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < KT) load_stage(next % kStages);
    cp_async_commit();

    const int stage = kt % kStages;
    const uint32_t a_stage = sA + stage * BM * kRowStride;
    const uint32_t b_stage = sB + stage * BN * kRowStride;
#pragma unroll
    for (int ks = 0; ks < kSliceBytes / 32; ++ks) {  // 32 bytes of reduction per mma
      uint32_t af[MT][4];
      uint32_t bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // matrices: rows 0-7 / 8-15 (lane bit 3) x bytes 0-15 / 16-31 (lane bit 4)
        const int row = warp_m * WM + mt * 16 + (lane & 15);
        const int col = ks * 32 + (lane >> 4) * 16;
        ldmatrix_x4(af[mt], a_stage + row * kRowStride + col);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // matrices: (n 0-7, bytes 0-15), (n 0-7, bytes 16-31), (n 8-15, ...), (n 8-15, ...)
        const int row = warp_n * WN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int col = ks * 32 + ((lane >> 3) & 1) * 16;
        uint32_t r4[4];
        ldmatrix_x4(r4, b_stage + row * kRowStride + col);
        bf[2 * np][0] = r4[0];
        bf[2 * np][1] = r4[1];
        bf[2 * np + 1][0] = r4[2];
        bf[2 * np + 1][1] = r4[3];
      }
      if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) af[mt][e] = to_tf32(af[mt][e]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) bf[nt][e] = to_tf32(bf[nt][e]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  // Drain (only empty groups can remain) and let every warp finish reading the pipeline
  // buffers before the epilogue tile overwrites them.
  cp_async_wait<0>();
  __syncthreads();

  float* tile = reinterpret_cast<float*>(smem);
  int64_t* row_off = reinterpret_cast<int64_t*>(smem + Smem::kMain);
  const int64_t k_base = static_cast<int64_t>(grp) * p.Kg;
  const int g = lane >> 2;
  const int t4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = warp_n * WN + nt * 8 + 2 * t4;
    float sc0, sh0, sc1, sh1;
    channel_affine(p, k_base, n0 + col, sc0, sh0);
    channel_affine(p, k_base, n0 + col + 1, sc1, sh1);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int row = warp_m * WM + mt * 16 + g;
      *reinterpret_cast<float2*>(tile + row * Smem::kLd + col) =
          make_float2(acc[mt][nt][0] * sc0 + sh0, acc[mt][nt][1] * sc1 + sh1);
      *reinterpret_cast<float2*>(tile + (row + 8) * Smem::kLd + col) =
          make_float2(acc[mt][nt][2] * sc0 + sh0, acc[mt][nt][3] * sc1 + sh1);
    }
  }
  if (tid < BM) row_off[tid] = output_row_offset(p, m0 + tid);
  __syncthreads();
  epilogue_from_smem<T, BM, BN>(tile, Smem::kLd, row_off, p, m0, n0, grp, n_tile);
}

// ---------------------------------------------------------------------------------------
// SIMT kernel: 64 x 64 tile, 16 reduction elements per step, 4 x 4 outputs per thread.
// ---------------------------------------------------------------------------------------
constexpr int kSimtBM = 64;
constexpr int kSimtBN = 64;
constexpr int kSimtBK = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_fprop_simt_kernel(const ConvFpropParams p) {
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK;
  constexpr int LDA = BM + 1;  // [BK][BM + 1]: 2-way conflicts at most on the transposing store
  constexpr int LDB = BN + 1;
  constexpr int LD = BN + 8;
  __shared__ float sA[BK * LDA];
  __shared__ float sB[BK * LDB];
  __shared__ __align__(16) float tile[BM * LD];
  __shared__ int64_t row_off[BM];

  const int tid = threadIdx.x;
  const int n_tiles = static_cast<int>((p.Kg + BN - 1) / BN);
  const int m_tile = static_cast<int>(blockIdx.x / n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int grp = blockIdx.z;
  const int m0 = m_tile * BM;
  const int n0 = n_tile * BN;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const int Kred = static_cast<int>(p.Kred);
  const int Cg = static_cast<int>(p.Cg);
  const int S = static_cast<int>(p.S);
  const int H = static_cast<int>(p.H);
  const int W = static_cast<int>(p.W);

  // Loads: reduction index fastest across threads (contiguous channels in NHWC and KRSC).
  const int lk = tid % BK;
  const int lrow = tid / BK;  // 0..15; rows lrow + 16 * i
  RowGather arow[4];
  int64_t brow[4];
  bool brow_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    arow[i] = row_gather(p, m0 + lrow + 16 * i, grp);
    const int kl = n0 + lrow + 16 * i;
    brow_ok[i] = kl < p.Kg;
    brow[i] = (static_cast<int64_t>(grp) * p.Kg + (brow_ok[i] ? kl : 0)) * p.Kred;
  }
  // Compute: rows ty + 16 i, columns tx + 16 j.
  const int tx = tid % 16;
  const int ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < Kred; k0 += BK) {
    const int kf = k0 + lk;
    const bool k_ok = kf < Kred;
    int r = 0, s = 0, c = 0;
    if (k_ok) {
      const int rs = kf / Cg;
      c = kf - rs * Cg;
      r = rs / S;
      s = rs - r * S;
    }
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int ih = arow[i].ih0 + r * p.dil_h;
      const int iw = arow[i].iw0 + s * p.dil_w;
      const bool ok = arow[i].ok && k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
      av[i] = ok ? to_float(x[arow[i].base + (static_cast<int64_t>(ih) * W + iw) * p.C + c]) : 0.f;
      bv[i] = (brow_ok[i] && k_ok) ? to_float(w[brow[i] + kf]) : 0.f;
    }
    __syncthreads();  // the previous step's reads of sA/sB are done
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sA[lk * LDA + lrow + 16 * i] = av[i];
      sB[lk * LDB + lrow + 16 * i] = bv[i];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[kk * LDA + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sB[kk * LDB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  const int64_t k_base = static_cast<int64_t>(grp) * p.Kg;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float sc, sh;
    channel_affine(p, k_base, n0 + tx + 16 * j, sc, sh);
#pragma unroll
    for (int i = 0; i < 4; ++i) tile[(ty + 16 * i) * LD + tx + 16 * j] = acc[i][j] * sc + sh;
  }
  if (tid < BM) row_off[tid] = output_row_offset(p, m0 + tid);
  __syncthreads();
  epilogue_from_smem<T, BM, BN>(tile, LD, row_off, p, m0, n0, grp, n_tile);
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
void launch_tc(const ConvFpropParams& p, cudaStream_t stream) {
  using Smem = TcSmem<BM, BN>;
  auto kernel = conv_fprop_tc_kernel<T, BM, BN, WARPS_M, WARPS_N>;
  // Over 48 KB of dynamic shared memory needs the opt-in (set per device, cheap to repeat).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes));
  const int64_t tiles = ((p.M + BM - 1) / BM) * ((p.Kg + BN - 1) / BN);
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(p.groups));
  kernel<<<grid, kThreads, Smem::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_tc_tile(const ConvFpropParams& p, ConvTile tile, cudaStream_t stream) {
  switch (tile) {
    case ConvTile::M128N128:
      launch_tc<T, 128, 128, 2, 4>(p, stream);  // warp tile 64 x 32
      break;
    case ConvTile::M128N64:
      launch_tc<T, 128, 64, 4, 2>(p, stream);  // warp tile 32 x 32
      break;
    case ConvTile::M64N64:
      launch_tc<T, 64, 64, 2, 4>(p, stream);  // warp tile 32 x 16
      break;
  }
}

template <typename T>
void launch_simt(const ConvFpropParams& p, cudaStream_t stream) {
  const int64_t tiles = ((p.M + kSimtBM - 1) / kSimtBM) * ((p.Kg + kSimtBN - 1) / kSimtBN);
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(p.groups));
  conv_fprop_simt_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int conv_fprop_tc_smem_bytes(ConvTile tile) {
  switch (tile) {
    case ConvTile::M128N128:
      return TcSmem<128, 128>::kBytes;
    case ConvTile::M128N64:
      return TcSmem<128, 64>::kBytes;
    case ConvTile::M64N64:
      return TcSmem<64, 64>::kBytes;
  }
  return 0;
}

void launch_conv_fprop_tc(const ConvFpropParams& p, DType dt, ConvTile tile, cudaStream_t stream) {
  switch (dt) {
    case DType::Half:
      launch_tc_tile<__half>(p, tile, stream);
      break;
    case DType::BFloat16:
      launch_tc_tile<__nv_bfloat16>(p, tile, stream);
      break;
    case DType::Float:
      launch_tc_tile<float>(p, tile, stream);
      break;
    default:
      TORCH_CHECK(false, "conv fprop (tensor cores): unsupported dtype");
  }
}

void launch_conv_fprop_simt(const ConvFpropParams& p, DType dt, cudaStream_t stream) {
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
      TORCH_CHECK(false, "conv fprop (SIMT): unsupported dtype");
  }
}

}  // namespace resconv
