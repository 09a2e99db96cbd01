// resconv's epilogue visitor nodes for the CUTLASS sm90 (TMA warp-specialised) epilogue:
//  * ReluIf: max(v, 0) that keeps NaN (torch.relu), switched on by a runtime flag;
//  * Sm90BnPartialStats: BatchNorm statistics partials of the conv output y, per channel and
//    per 64 output rows (kStatsTileRows), from the fp32 values of the epilogue: (count, mean,
//    M2), computed as the hand-written kernels do (pivot-shifted two-pass over the rows, then
//    Chan's merge in a fixed order; no atomics), for the fixed-order Chan merge of bn_finalize.
// Device code for sm_90a; included by csrc/hopper_*.cu only where they compile CUTLASS.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/array.h>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cute/tensor.hpp>

#include "chan.cuh"

namespace resconv::hopper {

// ---- ReLU that keeps NaN, on a runtime switch --------------------------------------------
template <class T>
struct ReluIf {
  struct Arguments {
    bool relu = false;
  };
  CUTLASS_HOST_DEVICE T operator()(T const& v, Arguments const& a) const {
    return (a.relu && v < T(0)) ? T(0) : v;  // not max(v, 0): NaN < 0 is false, NaN passes
  }
};

template <class T, int N>
struct ReluIf<cutlass::Array<T, N>> {
  using Arguments = typename ReluIf<T>::Arguments;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v, Arguments const& a) const {
    cutlass::Array<T, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = (a.relu && v[i] < T(0)) ? T(0) : v[i];
    return out;
  }
};

// ---- BatchNorm statistics partials ------------------------------------------------------
// A node with one child (y, fp32): passes y through unchanged and writes, for every channel
// n and every SegRows-row segment t of the GEMM rows (output pixels in N*P*Q order),
//   count[t] = rows of the segment, mean[t * ld + n], m2[t * ld + n] (sum of squared deviations).
// Each epilogue subtile (EpiM x EpiN, EpiM a multiple of SegRows) is staged in shared memory;
// then every (segment, channel) of the subtile is reduced by Q consecutive threads, each over
// SegRows / Q rows (its first row as pivot: the sum is taken relative to it, then the squared
// deviations from the mean), merged with Chan's formula in lane order.
template <int EpiM, int EpiN, int NumThreads, int SegRows>
struct Sm90BnPartialStats {
  static_assert(EpiM % SegRows == 0, "epilogue subtiles hold whole statistics segments");
  static constexpr int kSegs = EpiM / SegRows;
  static constexpr int kQ = NumThreads / (kSegs * EpiN);  // threads per (segment, channel)
  static_assert(kQ * kSegs * EpiN == NumThreads && (kQ & (kQ - 1)) == 0 && kQ <= 32 && SegRows % kQ == 0,
                "every thread reduces an equal share of one (segment, channel)");
  static constexpr int kLd = EpiN + 1;  // staging row stride (floats)

  struct SharedStorage {
    alignas(16) float y[EpiM * kLd];
  };

  struct Arguments {
    float* mean = nullptr;   // [T, ld]
    float* m2 = nullptr;     // [T, ld]
    float* count = nullptr;  // [T]
    int64_t ld = 0;          // channels (K)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.mean != nullptr && args.m2 != nullptr && args.count != nullptr;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE Sm90BnPartialStats() {}
  CUTLASS_HOST_DEVICE Sm90BnPartialStats(Params const& params, SharedStorage const& shared)
      : params(params), smem(const_cast<float*>(shared.y)) {}

  Params params;
  float* smem = nullptr;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::detail::EmptyProducerLoadCallbacks{};
  }

  template <class CoordTensor>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor coords, Params const& params, float* smem, int64_t M, int64_t N,
                                          int64_t m0, int64_t n0, bool first_n_tile, int thread_idx)
        : coords(coords), params(params), smem(smem), M(M), N(N), m0(m0), n0(n0), first_n_tile(first_n_tile),
          thread_idx(thread_idx) {}

    CoordTensor coords;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N): (m, n) of each value, relative to the CTA tile
    Params const& params;
    float* smem;
    int64_t M, N;    // GEMM rows (N*P*Q) and columns (K)
    int64_t m0, n0;  // the CTA tile's first row and column
    bool first_n_tile;
    int thread_idx;

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementInput, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& frg_y) {
      using namespace cute;
      Tensor c = coords(_, _, _, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const auto crd = c(epi_v * FragmentSize + i);
        const int r = static_cast<int>(get<0>(crd)) - epi_m * EpiM;
        const int col = static_cast<int>(get<1>(crd)) - epi_n * EpiN;
        smem[r * kLd + col] = static_cast<float>(frg_y[i]);
      }
      return frg_y;
    }

    template <class STensor, class SyncFn, class VTensor>
    CUTLASS_DEVICE void reduce(STensor&&, SyncFn const& sync_fn, int epi_m, int epi_n, bool, VTensor) {
      sync_fn();  // the subtile's y is staged
      const int pair = thread_idx / kQ;
      const int q = thread_idx % kQ;
      const int seg = pair / EpiN;
      const int col = pair % EpiN;
      const int64_t row0 = m0 + int64_t(epi_m) * EpiM + int64_t(seg) * SegRows;  // the segment's first GEMM row
      const int64_t gcol = n0 + int64_t(epi_n) * EpiN + col;
      const int64_t left = M - row0;
      const int rows = left <= 0 ? 0 : (left < SegRows ? static_cast<int>(left) : SegRows);
      constexpr int kShare = SegRows / kQ;
      const int lo = q * kShare;
      const int hi = rows < lo + kShare ? rows : lo + kShare;  // rows [lo, hi) of the segment
      const float* ys = smem + (seg * SegRows) * kLd + col;
      float n = 0.f, mean = 0.f, m2 = 0.f;
      if (hi > lo) {
        const float pivot = ys[lo * kLd];
        float sum = 0.f;
        for (int r = lo; r < hi; ++r) sum += ys[r * kLd] - pivot;
        n = static_cast<float>(hi - lo);
        mean = pivot + sum / n;
        for (int r = lo; r < hi; ++r) {
          const float d = ys[r * kLd] - mean;
          m2 += d * d;
        }
      }
      // Merge the kQ shares of consecutive lanes: lane q takes lane q + off's, in order.
      CUTLASS_PRAGMA_UNROLL
      for (int off = 1; off < kQ; off <<= 1) {
        const float nb = __shfl_down_sync(0xffffffffu, n, off);
        const float mb = __shfl_down_sync(0xffffffffu, mean, off);
        const float qb = __shfl_down_sync(0xffffffffu, m2, off);
        if ((q & (2 * off - 1)) == 0) chan_combine(n, mean, m2, nb, mb, qb);
      }
      if (q == 0 && rows > 0 && gcol < N) {
        const int64_t t = row0 / SegRows;
        params.mean[t * params.ld + gcol] = mean;
        params.m2[t * params.ld + gcol] = m2;
        if (first_n_tile && epi_n == 0 && col == 0) params.count[t] = static_cast<float>(rows);
      }
      sync_fn();  // everyone is done with the staging buffer before the next subtile's visit
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    using namespace cute;
    Tensor coords = cutlass::epilogue::fusion::detail::sm90_partition_for_epilogue<ReferenceSrc>(
        args.cD, args.epi_tile, args.tiled_copy, args.thread_idx);
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    const int64_t tile_m = size<0>(args.tile_shape_mnk);
    const int64_t tile_n = size<1>(args.tile_shape_mnk);
    return ConsumerStoreCallbacks<decltype(coords)>(coords, params, smem, int64_t(size(M)), int64_t(size(N)),
                                                    int64_t(m) * tile_m, int64_t(n) * tile_n, int64_t(n) == 0,
                                                    args.thread_idx);
  }
};

}  // namespace resconv::hopper
