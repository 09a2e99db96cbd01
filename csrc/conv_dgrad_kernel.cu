// Implicit-GEMM conv2d input gradient (dgrad), with the fused dReLU/dBN prologue.
//
//   dx[n, c, h, w] = sum_{k, r, s} dy[n, k, p, q] * W[k, c, r, s],
//   h + pad_top = p*stride_h + r*dil_h,   w + pad_left = q*stride_w + s*dil_w.
//
// No zero-inserted dy: the input pixels are split into stride_h*stride_w phases
// (conv_backward_plan.h), one per blockIdx.z; a phase's pixels receive only the phase's taps,
// so every reduction step does useful work. GEMM view per (group, phase): M = N * rows * cols
// of the phase (input pixels), columns = Cg input channels, reduction = (tap, k) with k fastest.
//
//  * conv_dgrad_tc_kernel: tensor cores, the fprop kernel's building blocks (cp.async pipeline
//    of 64-byte reduction slices, ldmatrix, mma.sync). dy is channels-last, so a slice of one
//    tap is a 16-byte-vector gather along k; the filters are repacked by the launcher to
//    [groups, R, S, Cg, Kg] so that their tile is k-contiguous too. With the prologue, g,
//    relu_out and y land in three staging buffers and each thread turns its own vectors into dy
//    after its copies arrive (before the CTA barrier that publishes the slice).
//  * conv_dgrad_simt_kernel: any Kg / Cg / layout (strides), reduction (tap, k) flattened,
//    fp32 FMA.
// Both write dx through its strides; every dx element belongs to exactly one (phase, tile),
// is written once (zeros for phases without taps), and no atomics are used: deterministic.
#include <c10/cuda/CUDAException.h>

#include "conv_backward.cuh"

namespace resconv {
namespace {

constexpr int kThreads = 256;

// The stride phase of this CTA (blockIdx.z) on both axes.
struct Phase2D {
  AxisPhase h, w;
  int M;  // N * h.count * w.count (<= M_max < 2^31)
};

__device__ __forceinline__ Phase2D cta_phase(const ConvDgradParams& p) {
  const int phase = static_cast<int>(blockIdx.z);
  Phase2D ph;
  ph.h = axis_phase(phase / p.stride_w, static_cast<int>(p.H), p.pad_h, p.stride_h, p.dil_h, static_cast<int>(p.R),
                    p.ph_h);
  ph.w = axis_phase(phase % p.stride_w, static_cast<int>(p.W), p.pad_w, p.stride_w, p.dil_w, static_cast<int>(p.S),
                    p.ph_w);
  ph.M = static_cast<int>(p.N * ph.h.count * ph.w.count);
  return ph;
}

// Row m of the phase: image n, phase position (i, j) -> input pixel (first + i*stride, ...).
struct PhaseRow {
  int n, i, j;
  bool ok;  // m < M
};

__device__ __forceinline__ PhaseRow phase_row(const Phase2D& ph, int m) {
  PhaseRow r;
  r.ok = m < ph.M;
  const int mm = r.ok ? m : 0;
  const int hw = ph.h.count * ph.w.count;  // > 0 whenever M > 0 (callers exit otherwise)
  r.n = mm / hw;
  const int rem = mm - r.n * hw;
  r.i = rem / ph.w.count;
  r.j = rem - r.i * ph.w.count;
  return r;
}

// dx offset of row m without the channel term, -1 past M.
__device__ __forceinline__ int64_t dx_row_offset(const ConvDgradParams& p, const Phase2D& ph, int m) {
  const PhaseRow r = phase_row(ph, m);
  if (!r.ok) return -1;
  const int64_t h = ph.h.first + static_cast<int64_t>(r.i) * p.stride_h;
  const int64_t w = ph.w.first + static_cast<int64_t>(r.j) * p.stride_w;
  return r.n * p.dx_sn + h * p.dx_sh + w * p.dx_sw;
}

// Precondition: `tile` ([BM][ld] fp32, shared) holds dx for rows m0.. and in-group columns
// n0..; row_off[r] from dx_row_offset. Called by all threads after a __syncthreads().
template <typename T, int BM, int BN>
__device__ __forceinline__ void store_dx_tile(const float* tile, int ld, const int64_t* row_off,
                                              const ConvDgradParams& p, int n0, int grp) {
  const int tid = threadIdx.x;
  const int Cg = static_cast<int>(p.Cg);
  const int64_t c_base = static_cast<int64_t>(grp) * p.Cg + n0;
  T* dx = static_cast<T*>(p.dx);
  if (p.vec_out) {
    // Channels-last dx, Cg % V == 0: a 16-byte chunk is all inside or all outside Cg.
    constexpr int V = 16 / sizeof(T);
    constexpr int kChunks = BN / V;
    for (int j = tid; j < BM * kChunks; j += kThreads) {
      const int row = j / kChunks;
      const int col = (j % kChunks) * V;
      const int64_t off = row_off[row];
      if (off < 0 || n0 + col >= Cg) continue;
      Vec<T, V> v;
#pragma unroll
      for (int e = 0; e < V; ++e) v.v[e] = from_float<T>(tile[row * ld + col + e]);
      *reinterpret_cast<Vec<T, V>*>(dx + off + c_base + col) = v;
    }
  } else {
    // Scalar stores; consecutive threads walk dx's fastest dimension.
    const bool c_fastest = p.dx_sc == 1;
    for (int j = tid; j < BM * BN; j += kThreads) {
      const int row = c_fastest ? j / BN : j % BM;
      const int col = c_fastest ? j % BN : j / BM;
      const int64_t off = row_off[row];
      if (off < 0 || n0 + col >= Cg) continue;
      dx[off + (c_base + col) * p.dx_sc] = from_float<T>(tile[row * ld + col]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------
constexpr int kSliceBytes = 64;  // reduction bytes per tile row per pipeline stage
constexpr int kRowStride = 80;   // padded smem row (bytes): conflict-free ldmatrix phases

template <bool PRO>
constexpr int tc_stages() {
  return PRO ? 3 : 4;  // the prologue's staging buffers triple the dy tile
}

template <int BM, int BN, bool PRO>
struct DgradSmem {
  static constexpr int kStages = tc_stages<PRO>();
  static constexpr int kATile = BM * kRowStride;  // bytes of one stage of one dy buffer
  static constexpr int kBTile = BN * kRowStride;
  static constexpr int kABufs = PRO ? 3 : 1;  // g (becomes dy), relu_out, y
  static constexpr int kPipe = kStages * (kABufs * kATile + kBTile);
  static constexpr int kLd = BN + 8;  // epilogue tile row (floats)
  static constexpr int kEpi = BM * kLd * 4;
  static constexpr int kMain = kPipe > kEpi ? kPipe : kEpi;
  static constexpr int kBytes = kMain + BM * 8;  // + int64 row offsets
};

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool PRO>
__global__ void __launch_bounds__(kThreads) conv_dgrad_tc_kernel(const ConvDgradParams p) {
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "8 warps");
  constexpr int WM = BM / WARPS_M;
  constexpr int WN = BN / WARPS_N;
  constexpr int MT = WM / 16;
  constexpr int NT = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "B fragments are loaded 16 columns at a time");
  constexpr int VEC = 16 / sizeof(T);
  constexpr int BKE = kSliceBytes / sizeof(T);
  static_assert(BM % 64 == 0 && BN % 64 == 0, "loader passes of 64 rows");
  constexpr int A_PASSES = BM / 64;
  constexpr int B_PASSES = BN / 64;
  using Smem = DgradSmem<BM, BN, PRO>;
  constexpr int STAGES = Smem::kStages;
  static_assert(STAGES * A_PASSES <= 32, "validity bits fit one word");

  extern __shared__ __align__(16) unsigned char smem[];
  // [STAGES][BM][kRowStride] dy (g), then (PRO) relu_out and y alike, then [STAGES][BN][kRowStride] W.
  unsigned char* const a_buf = smem;
  [[maybe_unused]] unsigned char* const r_buf = smem + STAGES * Smem::kATile;
  [[maybe_unused]] unsigned char* const y_buf = smem + 2 * STAGES * Smem::kATile;
  unsigned char* const b_buf = smem + Smem::kABufs * STAGES * Smem::kATile;
  const uint32_t sA = smem_u32(a_buf);
  const uint32_t sB = smem_u32(b_buf);

  const Phase2D ph = cta_phase(p);
  const int n_tiles = static_cast<int>((p.Cg + BN - 1) / BN);
  const int m_tile = static_cast<int>(blockIdx.x / n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int grp = static_cast<int>(blockIdx.y);
  const int m0 = m_tile * BM;
  const int n0 = n_tile * BN;
  if (m0 >= ph.M) return;  // the grid is sized for the largest phase (uniform per CTA)

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / WARPS_N;
  const int warp_n = warp % WARPS_N;

  const T* dy = static_cast<const T*>(p.dy);
  [[maybe_unused]] const T* relu_out = static_cast<const T*>(p.pro.relu_out);
  [[maybe_unused]] const T* yin = static_cast<const T*>(p.pro.y);
  const T* w = static_cast<const T*>(p.w);
  const int Kg = static_cast<int>(p.Kg);
  const int P = static_cast<int>(p.P);
  const int Q = static_cast<int>(p.Q);

  // Loader: thread -> 16-byte vector `vcol` of rows lrow + 64 * pass.
  const int vcol = tid & 3;
  const int lrow = tid >> 2;
  int64_t a_row[A_PASSES];  // dy offset of (n, a_p, a_q, group's first channel): the first taps' pixel
  int a_p[A_PASSES], a_q[A_PASSES];  // output row / column of the first taps (jr = js = 0)
  bool a_ok[A_PASSES];
#pragma unroll
  for (int i = 0; i < A_PASSES; ++i) {
    const PhaseRow r = phase_row(ph, m0 + lrow + 64 * i);
    a_ok[i] = r.ok;
    a_p[i] = r.i + ph.h.base;
    a_q[i] = r.j + ph.w.base;
    a_row[i] = r.n * p.dy_sn + a_p[i] * p.dy_sp + a_q[i] * p.dy_sq + static_cast<int64_t>(grp) * Kg;  // channel stride 1
  }
  int64_t b_col[B_PASSES];
  bool b_ok[B_PASSES];
#pragma unroll
  for (int i = 0; i < B_PASSES; ++i) {
    const int c = n0 + lrow + 64 * i;
    b_ok[i] = c < p.Cg;
    b_col[i] = static_cast<int64_t>(b_ok[i] ? c : 0) * Kg;
  }

  const int n_kb = (Kg + BKE - 1) / BKE;
  const int KT = ph.h.taps * ph.w.taps * n_kb;
  [[maybe_unused]] uint32_t valid_bits = 0;  // PRO: bit (slot * A_PASSES + i): that dy vector lies inside dy

  // The reduction walk (tap jr, tap js, channel block kb) of this phase, advanced slice by slice
  // without division (conv_walk.h); loads are issued in slice order.
  PhaseGeometry pg;
  pg.n_kb = n_kb, pg.taps_w = ph.w.taps;
  pg.tap0_h = ph.h.tap0, pg.tap0_w = ph.w.tap0;
  pg.tap_step_h = p.ph_h.tap_step, pg.tap_step_w = p.ph_w.tap_step;
  pg.out_step_h = p.ph_h.out_step, pg.out_step_w = p.ph_w.out_step;
  PhaseWalk walk = phase_walk_at(0, pg);
  auto load_stage = [&](int slot) {
    const int kb = walk.kb;
    const int r = walk.r, s = walk.s, dp = walk.dp, dq = walk.dq;
    phase_walk_advance(walk, pg);
    const int kf = kb * BKE + vcol * VEC;  // in-group output channel of this thread's vector
    const bool k_ok = kf < Kg;             // Kg % VEC == 0: the whole vector
    const int64_t shift = kf - (dp * p.dy_sp + dq * p.dy_sq);  // the tap's offset, the same for every row
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) {
      const int pp = a_p[i] - dp;
      const int qq = a_q[i] - dq;
      const bool ok = a_ok[i] && k_ok && pp >= 0 && pp < P && qq >= 0 && qq < Q;
      const int64_t off = a_row[i] + shift;
      const uint32_t dst = (slot * BM + lrow + 64 * i) * kRowStride + vcol * 16;
      cp_async_16(sA + dst, ok ? dy + off : dy, ok);
      if constexpr (PRO) {
        if (relu_out != nullptr) cp_async_16(smem_u32(r_buf) + dst, ok ? relu_out + off : relu_out, ok);
        if (yin != nullptr) cp_async_16(smem_u32(y_buf) + dst, ok ? yin + off : yin, ok);
        const uint32_t bit = 1u << (slot * A_PASSES + i);
        valid_bits = ok ? (valid_bits | bit) : (valid_bits & ~bit);
      }
    }
    const int64_t tap_off = ((static_cast<int64_t>(grp) * p.R + r) * p.S + s) * p.Cg * Kg;
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const bool ok = b_ok[i] && k_ok;
      cp_async_16(sB + (slot * BN + lrow + 64 * i) * kRowStride + vcol * 16, ok ? w + tap_off + b_col[i] + kf : w,
                  ok);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < KT) load_stage(st);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of slice kt have landed
    const int slot = kt % STAGES;
    if constexpr (PRO) {
      // dy from this thread's own vectors of slice kt (nobody else reads them before the barrier).
      const int64_t k0 = static_cast<int64_t>(grp) * Kg + (kt % n_kb) * BKE + vcol * VEC;
#pragma unroll
      for (int i = 0; i < A_PASSES; ++i) {
        const int off = (slot * BM + lrow + 64 * i) * kRowStride + vcol * 16;
        prologue_vector<T>(p.pro, a_buf + off, r_buf + off, y_buf + off, k0,
                           (valid_bits >> (slot * A_PASSES + i)) & 1u);
      }
    }
    // Slice kt (as dy) is visible to all; everyone is done with slice kt - 1, whose slot the
    // load below overwrites.
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_stage(next % STAGES);
    cp_async_commit();

    const uint32_t a_stage = sA + slot * BM * kRowStride;
    const uint32_t b_stage = sB + slot * BN * kRowStride;
#pragma unroll
    for (int ks = 0; ks < kSliceBytes / 32; ++ks) {
      uint32_t af[MT][4];
      uint32_t bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_m * WM + mt * 16 + (lane & 15);
        const int col = ks * 32 + (lane >> 4) * 16;
        ldmatrix_x4(af[mt], a_stage + row * kRowStride + col);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
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
  cp_async_wait<0>();
  __syncthreads();

  float* tile = reinterpret_cast<float*>(smem);
  int64_t* row_off = reinterpret_cast<int64_t*>(smem + Smem::kMain);
  const int g = lane >> 2;
  const int t4 = lane & 3;
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
  if (tid < BM) row_off[tid] = dx_row_offset(p, ph, m0 + tid);
  __syncthreads();
  store_dx_tile<T, BM, BN>(tile, Smem::kLd, row_off, p, n0, grp);
}

// ---------------------------------------------------------------------------------------
// SIMT kernel: 64 x 64 tile, 16 reduction elements per step, 4 x 4 outputs per thread.
// ---------------------------------------------------------------------------------------
constexpr int kSimtBM = 64;
constexpr int kSimtBN = 64;
constexpr int kSimtBK = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_dgrad_simt_kernel(const ConvDgradParams p) {
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK;
  constexpr int LDA = BM + 1;
  constexpr int LDB = BN + 1;
  constexpr int LD = BN + 8;
  __shared__ float sA[BK * LDA];
  __shared__ float sB[BK * LDB];
  __shared__ __align__(16) float tile[BM * LD];
  __shared__ int64_t row_off[BM];

  const Phase2D ph = cta_phase(p);
  const int n_tiles = static_cast<int>((p.Cg + BN - 1) / BN);
  const int m_tile = static_cast<int>(blockIdx.x / n_tiles);
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int grp = static_cast<int>(blockIdx.y);
  const int m0 = m_tile * BM;
  const int n0 = n_tile * BN;
  if (m0 >= ph.M) return;

  const int tid = threadIdx.x;
  const T* dy = static_cast<const T*>(p.dy);
  const T* w = static_cast<const T*>(p.w);
  const int Kg = static_cast<int>(p.Kg);
  const int P = static_cast<int>(p.P);
  const int Q = static_cast<int>(p.Q);

  // Loads: reduction index fastest across threads.
  const int lk = tid % BK;
  const int lrow = tid / BK;  // rows / columns lrow + 16 * i
  int64_t a_base[4];
  int a_p[4], a_q[4];
  bool a_ok[4];
  int64_t b_col[4];
  bool b_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const PhaseRow r = phase_row(ph, m0 + lrow + 16 * i);
    a_ok[i] = r.ok;
    a_base[i] = r.n * p.dy_sn;
    a_p[i] = r.i + ph.h.base;
    a_q[i] = r.j + ph.w.base;
    const int c = n0 + lrow + 16 * i;
    b_ok[i] = c < p.Cg;
    b_col[i] = static_cast<int64_t>(b_ok[i] ? c : 0) * p.w_sc;
  }
  const int tx = tid % 16;
  const int ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  // Reduction index kk = tap * Kg + k (taps of this phase only).
  const int KT = ph.h.taps * ph.w.taps * Kg;
  for (int k0 = 0; k0 < KT; k0 += BK) {
    const int kk = k0 + lk;
    const bool k_ok = kk < KT;
    const int tap = k_ok ? kk / Kg : 0;
    const int k = k_ok ? kk - tap * Kg : 0;
    const int jr = tap / ph.w.taps;
    const int js = tap - jr * ph.w.taps;
    const int r = ph.h.tap0 + jr * p.ph_h.tap_step;
    const int s = ph.w.tap0 + js * p.ph_w.tap_step;
    const int dp = jr * p.ph_h.out_step;
    const int dq = js * p.ph_w.out_step;
    const int64_t kglob = static_cast<int64_t>(grp) * Kg + k;
    const int64_t w_off = kglob * p.w_sk + static_cast<int64_t>(r) * p.w_sr + static_cast<int64_t>(s) * p.w_ss;
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int pp = a_p[i] - dp;
      const int qq = a_q[i] - dq;
      const bool ok = a_ok[i] && k_ok && pp >= 0 && pp < P && qq >= 0 && qq < Q;
      av[i] = ok ? load_dy<T>(dy, p.pro, a_base[i] + pp * p.dy_sp + qq * p.dy_sq + kglob * p.dy_sk, kglob) : 0.f;
      bv[i] = (b_ok[i] && k_ok) ? to_float(w[w_off + b_col[i]]) : 0.f;
    }
    __syncthreads();  // the previous step's reads of sA/sB are done
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sA[lk * LDA + lrow + 16 * i] = av[i];
      sB[lk * LDB + lrow + 16 * i] = bv[i];
    }
    __syncthreads();
#pragma unroll
    for (int kq = 0; kq < BK; ++kq) {
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
  if (tid < BM) row_off[tid] = dx_row_offset(p, ph, m0 + tid);
  __syncthreads();
  store_dx_tile<T, BM, BN>(tile, LD, row_off, p, n0, grp);
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------
dim3 dgrad_grid(const ConvDgradParams& p, int64_t bm, int64_t bn) {
  const int64_t tiles = (p.M_max + bm - 1) / bm * ((p.Cg + bn - 1) / bn);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.groups),
              static_cast<unsigned>(p.stride_h * p.stride_w));
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool PRO>
void launch_tc(const ConvDgradParams& p, cudaStream_t stream) {
  using Smem = DgradSmem<BM, BN, PRO>;
  auto kernel = conv_dgrad_tc_kernel<T, BM, BN, WARPS_M, WARPS_N, PRO>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes));
  kernel<<<dgrad_grid(p, BM, BN), kThreads, Smem::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool PRO>
void launch_tc_tile(const ConvDgradParams& p, ConvTile tile, cudaStream_t stream) {
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
void launch_tc_typed(const ConvDgradParams& p, ConvTile tile, cudaStream_t stream) {
  if (p.pro.a != nullptr)
    launch_tc_tile<T, true>(p, tile, stream);
  else
    launch_tc_tile<T, false>(p, tile, stream);
}

template <typename T>
void launch_simt(const ConvDgradParams& p, cudaStream_t stream) {
  conv_dgrad_simt_kernel<T><<<dgrad_grid(p, kSimtBM, kSimtBN), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int conv_dgrad_tc_smem_bytes(ConvTile tile, bool prologue) {
  switch (tile) {
    case ConvTile::M128N128:
      return prologue ? DgradSmem<128, 128, true>::kBytes : DgradSmem<128, 128, false>::kBytes;
    case ConvTile::M128N64:
      return prologue ? DgradSmem<128, 64, true>::kBytes : DgradSmem<128, 64, false>::kBytes;
    case ConvTile::M64N64:
      return prologue ? DgradSmem<64, 64, true>::kBytes : DgradSmem<64, 64, false>::kBytes;
  }
  return 0;
}

void launch_conv_dgrad_tc(const ConvDgradParams& p, DType dt, ConvTile tile, cudaStream_t stream) {
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
      TORCH_CHECK(false, "conv dgrad (tensor cores): unsupported dtype");
  }
}

void launch_conv_dgrad_simt(const ConvDgradParams& p, DType dt, cudaStream_t stream) {
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
      TORCH_CHECK(false, "conv dgrad (SIMT): unsupported dtype");
  }
}

}  // namespace resconv
