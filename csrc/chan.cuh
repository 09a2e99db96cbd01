// Chan, Golub & LeVeque (1979): the merge of two sets' moments, used by every reduction of
// BatchNorm statistics partials (the fprop epilogues, the finalize's tree, the Hopper
// epilogue's statistics node). One definition, so that they all round alike.
#pragma once

namespace resconv {

// Merge moments (n_b, mean_b, m2_b) into (n, mean, m2).
__device__ __forceinline__ void chan_combine(float& n, float& mean, float& m2, float n_b, float mean_b, float m2_b) {
  const float n_ab = n + n_b;
  const float w_b = n_ab > 0.f ? n_b / n_ab : 0.f;
  const float d = mean_b - mean;
  mean = mean + d * w_b;
  m2 = m2 + m2_b + d * d * n * w_b;
  n = n_ab;
}

}  // namespace resconv
