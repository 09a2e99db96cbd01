// Index plans of the conv backward kernels, shared by the device kernels, the host launchers
// and (through resconv._C) the Python tests, so that the tests check the very arithmetic the
// kernels run:
//  * dgrad's stride-phase decomposition (no zero-inserted dy: each phase visits only its taps);
//  * wgrad's split-K plan (fixed chunks of N*P*Q, reduced in a fixed order).
// Plain C++: compiled by nvcc for the kernels and by the host compiler for the launchers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RESCONV_HD __host__ __device__ __forceinline__
#else
#define RESCONV_HD inline
#endif

namespace resconv {

// ---- dgrad: stride phases ----------------------------------------------------------------
// dx[h] = sum over taps r and output rows p with h + pad = p*stride + r*dil. For one spatial
// axis (stride s, dilation d) the input positions split into s phases a = (h + pad) mod s; a
// position of phase a receives exactly the taps r with r*d = a (mod s). With g = gcd(d, s)
// those exist only when g divides a, and are r = tap0 + j*tap_step (tap_step = s/g), since
// d/g is invertible modulo s/g. Tap j of phase position i then reads output row
// p = i + base - j*out_step (out_step = d/g).
struct AxisPhasing {
  int g;         // gcd(dil, stride)
  int tap_step;  // stride / g
  int out_step;  // dil / g
  int inv;       // (dil / g)^-1 mod tap_step (0 when tap_step == 1)
};

// Host side: the per-axis constants (the kernels get them as arguments, no device table).
inline AxisPhasing axis_phasing(int stride, int dil) {
  int64_t a = stride, b = dil;
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  AxisPhasing pp;
  pp.g = static_cast<int>(a);
  pp.tap_step = stride / pp.g;
  pp.out_step = dil / pp.g;
  pp.inv = 0;
  if (pp.tap_step > 1) {
    // Extended Euclid on (out_step mod tap_step, tap_step): gcd 1 by construction.
    int64_t r0 = pp.tap_step, r1 = pp.out_step % pp.tap_step, s0 = 0, s1 = 1;
    while (r1 != 0) {
      const int64_t q = r0 / r1;
      int64_t t = r0 - q * r1;
      r0 = r1;
      r1 = t;
      t = s0 - q * s1;
      s0 = s1;
      s1 = t;
    }
    pp.inv = static_cast<int>(((s0 % pp.tap_step) + pp.tap_step) % pp.tap_step);
  }
  return pp;
}

// Phase `a` (0 <= a < stride) of one axis of size `size`, `ntaps` filter taps.
struct AxisPhase {
  int first;  // first input position of the phase: (first + pad) mod stride == a
  int count;  // its positions: first + i*stride < size, i < count
  int tap0;   // first tap of the phase
  int taps;   // number of taps (tap0 + j*tap_step < ntaps); 0: the phase's dx is zero
  int base;   // output row of (i = 0, j = 0); exact because tap0*dil = first + pad (mod stride)
};

RESCONV_HD AxisPhase axis_phase(int a, int size, int pad, int stride, int dil, int ntaps, AxisPhasing pp) {
  AxisPhase ph;
  ph.first = (a - pad % stride + stride) % stride;
  ph.count = (size - ph.first + stride - 1) / stride;  // size - first > -stride: never negative
  ph.tap0 = static_cast<int>((static_cast<int64_t>(a / pp.g) * pp.inv) % pp.tap_step);
  ph.taps = (a % pp.g == 0 && ph.tap0 < ntaps) ? (ntaps - ph.tap0 + pp.tap_step - 1) / pp.tap_step : 0;
  const int64_t num = static_cast<int64_t>(ph.first) + pad - static_cast<int64_t>(ph.tap0) * dil;
  ph.base = ph.taps > 0 ? static_cast<int>(num / stride) : 0;
  return ph;
}

// Rows of dgrad's largest phase: the grid is sized for it, smaller phases exit early.
inline int64_t dgrad_max_phase_rows(int64_t N, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w) {
  return N * ((H + stride_h - 1) / stride_h) * ((W + stride_w - 1) / stride_w);
}

// ---- wgrad: split-K over N*P*Q ---------------------------------------------------------------
// Every wgrad kernel reduces kWgradRows rows of N*P*Q per pipeline step; chunks are multiples
// of it so that only the last split has a partial step.
constexpr int kWgradRows = 32;
constexpr int64_t kWgradMinChunk = 512;  // rows per split worth a partial store + second pass
constexpr int kWgradMaxSplit = 256;      // bounds the fp32 partial buffer

struct WgradSplit {
  int64_t chunk;  // rows of N*P*Q per split (a multiple of kWgradRows)
  int split;      // number of splits, each non-empty: (split - 1) * chunk < npq <= split * chunk
};

// requested > 0: that many splits (fewer when npq has fewer chunks); else about `target_ctas`
// CTAs over `tiles` output tiles, each split at least kWgradMinChunk rows (one split when
// npq is shorter). npq >= 1.
inline WgradSplit wgrad_split(int64_t npq, int64_t tiles, int64_t target_ctas, int64_t requested) {
  int64_t split = requested;
  if (split <= 0) {
    const int64_t t = tiles < 1 ? 1 : tiles;
    const int64_t want = (target_ctas + t - 1) / t;
    const int64_t most = npq / kWgradMinChunk;  // every split at least kWgradMinChunk rows
    split = want < most ? want : most;
  }
  if (split < 1) split = 1;
  if (split > kWgradMaxSplit) split = kWgradMaxSplit;
  const int64_t per = (npq + split - 1) / split;
  WgradSplit s;
  s.chunk = (per + kWgradRows - 1) / kWgradRows * kWgradRows;
  s.split = static_cast<int>((npq + s.chunk - 1) / s.chunk);
  return s;
}

}  // namespace resconv
