// The few definitions every kernel family shares, the Hopper kernels included: storage dtypes
// and the BatchNorm partials' row count. Kept apart from kernels.h so that the Hopper
// translation units (CUTLASS, minutes to compile) do not depend on the hand-written kernels'
// interface and are not recompiled when it changes.
#pragma once

namespace resconv {

enum class DType : int { Half = 0, BFloat16 = 1, Float = 2, Double = 3 };

// Rows of one BatchNorm statistics partial: the conv epilogue writes one (count, mean, M2)
// per channel for every kStatsTileRows output pixels, whatever tile configuration ran.
constexpr int kStatsTileRows = 64;

}  // namespace resconv
