// Filters in the layouts the conv kernels read, repacked once and cached (host side).
//
// A filter is a parameter: it changes once per optimizer step at most, and not at all in
// inference, yet the kernels read it in their own layout. Repacking it on every call costs a
// read and a write of the filter each time; here the repack is kept and reused while the
// filter is unchanged. "Unchanged" is the same tensor object (held by a weak reference, so a
// new tensor at a freed address cannot match), the same version-counter value (every
// in-place write through autograd-visible ops bumps it: optimizer steps, copy_ under
// no_grad), the same data pointer, sizes, strides and dtype.
//
// Not cached (repacked on every call, as before): inference tensors (they have no version
// counter), and calls while the current CUDA stream captures a graph (the graph must contain
// the repack, so that a replay after an optimizer step reads the new values). Writes through
// `.data` bypass the version counter and are not seen: use in-place ops under
// torch.no_grad() to change a filter in place.
#pragma once

#include "common.h"

namespace resconv {

enum class FilterLayout : int64_t {
  // [K, R, S, C/groups] dense ("channels_last" of [K, C/groups, R, S]): fprop's, and the Hopper
  // kernels' filter for fprop and dgrad. C/groups zero-padded to a multiple of `pad_to` (the
  // RGB stem on tensor cores); the returned tensor is [K, Cpad, R, S] channels-last.
  KRSC = 0,
  // [groups, R, S, C/groups, K/groups] contiguous: the hand-written dgrad's (a tile row, one
  // input channel of one tap, is contiguous along the reduction over k).
  GRSCK = 1,
};

struct PackedFilter {
  Tensor t;        // dense in the layout, 16-byte aligned base (cp.async / TMA)
  bool cache_hit;  // taken from the cache
  bool repacked;   // a copy (false: the filter itself already had the layout)
};

// `weight` [K, C/groups, R, S] (any strides) in `layout`. pad_to >= 1 (KRSC only; 1: no padding).
PackedFilter packed_filter(const Tensor& weight, FilterLayout layout, int64_t groups, int64_t pad_to);

// The op cuda_packed_filter (diagnostics and tests; runs on CPU and CUDA tensors): a copy of
// what the kernels would read for `weight`, whether it came from the cache, and whether the
// packed tensor's base is 16-byte aligned. layout: FilterLayout as an int.
std::tuple<Tensor, bool, bool> packed_filter_op(const Tensor& weight, int64_t layout, int64_t groups, int64_t pad_to);

// (hits, misses, entries) since the last clear, and clearing (frees the cached copies).
struct FilterCacheStats {
  int64_t hits, misses, entries;
};
FilterCacheStats filter_cache_stats();
void filter_cache_clear();

}  // namespace resconv
