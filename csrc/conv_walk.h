// Division-free walks of the hand-written tensor-core kernels' main loops. Each thread loads
// the same vector column of every reduction slice, slice after slice; instead of recomputing
// its (tap, channel) or (image, row, column) from a flat index with integer divisions every
// slice (the review counted 2-3 divisions and 64-bit products per slice), it starts from one
// division-based decode and then advances by the slice with compares and adds only. The
// per-tap address offsets advance with it, so the main loop adds an offset to a row base.
//
// Shared by the device kernels and, through resconv._C, the CPU tests, which check every walk
// against the division-based decode over many sizes and steps. Plain C++.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RESCONV_WALK_HD __host__ __device__ __forceinline__
#else
#define RESCONV_WALK_HD inline
#endif

namespace resconv {

// a + b*na + c*na*nb += da + db*na + dc*na*nb in the mixed radix (na, nb), with da < na and
// db < nb: two carries, no division, no loop.
RESCONV_WALK_HD void radix_add(int& a, int& b, int& c, int da, int db, int dc, int na, int nb) {
  a += da;
  int carry = a >= na;
  if (carry) a -= na;
  b += db + carry;
  carry = b >= nb;
  if (carry) b -= nb;
  c += dc + carry;
}

// ---- fprop: the reduction index (r, s, c), c fastest, of the K R S C filters --------------
// A step of `step` reduction elements, decomposed once in the mixed radix (R, S, Cg): the
// advance is then two conditional subtractions (carries), whatever the step.
struct TapWalk {
  int c, s, r;  // c < Cg, s < S; r >= R: past the reduction's end
  int dh, dw;   // r * dil_h, s * dil_w: the tap's offset from the receptive field's corner
  int64_t off;  // dh * W * C + dw * C: its offset in the NHWC input, in elements
};

struct TapGeometry {
  int Cg, S, dil_h, dil_w;
  int64_t WC, C;   // NHWC strides of the input (all groups): a row, a pixel
  int dc, ds, dr;  // the step in the radix: step = (dr * S + ds) * Cg + dc
};

RESCONV_WALK_HD TapGeometry tap_geometry(int Cg, int S, int dil_h, int dil_w, int64_t W, int64_t C, int step) {
  TapGeometry g;
  g.Cg = Cg, g.S = S, g.dil_h = dil_h, g.dil_w = dil_w;
  g.WC = W * C, g.C = C;
  g.dc = step % Cg;
  g.ds = (step / Cg) % S;
  g.dr = step / Cg / S;
  return g;
}

RESCONV_WALK_HD void tap_walk_offsets(TapWalk& t, const TapGeometry& g) {
  t.dh = t.r * g.dil_h;
  t.dw = t.s * g.dil_w;
  t.off = static_cast<int64_t>(t.dh) * g.WC + static_cast<int64_t>(t.dw) * g.C;
}

// The walk at reduction index kf (one decode with divisions, outside the main loop).
RESCONV_WALK_HD TapWalk tap_walk_at(int kf, const TapGeometry& g) {
  TapWalk t;
  const int rs = kf / g.Cg;
  t.c = kf - rs * g.Cg;
  t.r = rs / g.S;
  t.s = rs - t.r * g.S;
  tap_walk_offsets(t, g);
  return t;
}

// Advance by the geometry's step: no division, no loop.
RESCONV_WALK_HD void tap_walk_advance(TapWalk& t, const TapGeometry& g) {
  radix_add(t.c, t.s, t.r, g.dc, g.ds, g.dr, g.Cg, g.S);
  tap_walk_offsets(t, g);
}

// ---- dgrad: the reduction (tap jr, tap js, channel block kb) of one stride phase --------
struct PhaseWalk {
  int kb, js, jr;  // kb < n_kb, js < taps_w; jr >= taps_h: past the end
  int dp, dq;      // jr * out_step_h, js * out_step_w: the output row / column shift
  int r, s;        // the filter tap: tap0 + j * tap_step
};

struct PhaseGeometry {
  int n_kb, taps_w;
  int tap0_h, tap0_w, tap_step_h, tap_step_w, out_step_h, out_step_w;
};

RESCONV_WALK_HD PhaseWalk phase_walk_at(int kt, const PhaseGeometry& g) {
  PhaseWalk w;
  w.kb = kt % g.n_kb;
  const int tap = kt / g.n_kb;
  w.jr = tap / g.taps_w;
  w.js = tap - w.jr * g.taps_w;
  w.dp = w.jr * g.out_step_h;
  w.dq = w.js * g.out_step_w;
  w.r = g.tap0_h + w.jr * g.tap_step_h;
  w.s = g.tap0_w + w.js * g.tap_step_w;
  return w;
}

// Advance by one slice: no division.
RESCONV_WALK_HD void phase_walk_advance(PhaseWalk& w, const PhaseGeometry& g) {
  if (++w.kb < g.n_kb) return;
  w.kb = 0;
  ++w.js;
  w.dq += g.out_step_w;
  w.s += g.tap_step_w;
  if (w.js < g.taps_w) return;
  w.js = 0;
  w.dq = 0;
  w.s = g.tap0_w;
  ++w.jr;
  w.dp += g.out_step_h;
  w.r += g.tap_step_h;
}

// ---- wgrad: output pixel npq -> (n, p, q) of the reduction over N*P*Q ----------------------
struct PixelWalk {
  int n, p, q;
};

struct PixelGeometry {
  int P, Q;
  int dq, dp, dn;  // the step in the radix (N, P, Q): step = (dn * P + dp) * Q + dq
};

RESCONV_WALK_HD PixelGeometry pixel_geometry(int P, int Q, int step) {
  PixelGeometry g;
  g.P = P, g.Q = Q;
  g.dq = step % Q;
  g.dp = (step / Q) % P;
  g.dn = step / Q / P;
  return g;
}

RESCONV_WALK_HD PixelWalk pixel_walk_at(int npq, const PixelGeometry& g) {
  PixelWalk w;
  const int PQ = g.P * g.Q;
  w.n = npq / PQ;
  const int rem = npq - w.n * PQ;
  w.p = rem / g.Q;
  w.q = rem - w.p * g.Q;
  return w;
}

// Advance by the geometry's step: no division, no loop.
RESCONV_WALK_HD void pixel_walk_advance(PixelWalk& w, const PixelGeometry& g) {
  radix_add(w.q, w.p, w.n, g.dq, g.dp, g.dn, g.Q, g.P);
}

}  // namespace resconv
