#include "filter_cache.h"

#include <mutex>
#include <vector>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/intrusive_ptr.h>

namespace resconv {
namespace {

constexpr size_t kMaxEntries = 256;  // a ResNet-50 has 53 convs; dead filters are swept first

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> owner;  // the filter; expired when it is freed
  const c10::TensorImpl* impl;
  FilterLayout layout;
  int64_t groups, pad_to;
  int64_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  Tensor packed;
};

std::mutex g_mutex;
std::vector<Entry> g_entries;  // oldest first
int64_t g_hits = 0, g_misses = 0;

bool same_filter(const Entry& e, const Tensor& w) {
  auto alive = e.owner.lock();
  return alive.get() == w.unsafeGetTensorImpl() && e.version == w._version() && e.data == w.data_ptr() &&
         e.sizes == w.sizes().vec() && e.strides == w.strides().vec() && e.dtype == w.scalar_type();
}

// A dense copy with a 16-byte aligned base when `t` is not one (`.contiguous()` returns `t`
// itself, storage offset included, when its layout already matches).
Tensor aligned(Tensor t) { return aligned16(t) ? t : t.clone(); }

Tensor pack(const Tensor& w, FilterLayout layout, int64_t groups, int64_t pad_to) {
  const int64_t K = w.size(0), Cg = w.size(1), R = w.size(2), S = w.size(3);  // [K, C/groups, R, S]
  if (layout == FilterLayout::GRSCK) {
    return aligned(w.reshape({groups, K / groups, Cg, R, S}).permute({0, 3, 4, 2, 1}).contiguous());
  }
  if (Cg % pad_to == 0) return dense_aligned(w, at::MemoryFormat::ChannelsLast);
  return pad_channels_last(w, pad_to);  // the same helper pads the input x
}

// Whether `t` already is the packed layout (no copy needed, nothing to cache).
bool already_packed(const Tensor& w, FilterLayout layout, int64_t groups, int64_t pad_to) {
  if (layout == FilterLayout::KRSC)
    return w.size(1) % pad_to == 0 && w.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(w);
  return false;  // GRSCK: `pack` returns a view of w only in degenerate shapes; it is cheap then
}

bool cacheable(const Tensor& w) {
  if (w.is_inference()) return false;  // no version counter
  if (w.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return false;  // the captured graph must contain the repack
  return true;
}

}  // namespace

PackedFilter packed_filter(const Tensor& weight, FilterLayout layout, int64_t groups, int64_t pad_to) {
  TORCH_CHECK(weight.dim() == 4 && groups >= 1 && weight.size(0) % groups == 0 && pad_to >= 1,
              "packed_filter: expected a [K, C/groups, R, S] filter, K divisible by groups, pad_to >= 1");
  TORCH_CHECK(layout == FilterLayout::KRSC || pad_to == 1, "packed_filter: padding is for the KRSC layout only");
  if (already_packed(weight, layout, groups, pad_to)) return {weight, false, false};
  // Packed from a detached alias (same storage and version counter): where a caller runs with
  // grad mode on (the conv backward ops under create_graph=True, the diagnostic op), a copy
  // recorded by autograd would hold the filter and its graph alive in the cache.
  const Tensor source = weight.detach();
  if (!cacheable(weight)) return {pack(source, layout, groups, pad_to), false, true};
  const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
  std::lock_guard<std::mutex> lock(g_mutex);
  // Sweep entries of freed filters (their copies' memory goes back now) and stale versions.
  std::vector<Entry> kept;
  kept.reserve(g_entries.size() + 1);
  Tensor hit;
  for (Entry& e : g_entries) {
    if (e.owner.expired()) continue;
    const bool key = e.impl == impl && e.layout == layout && e.groups == groups && e.pad_to == pad_to;
    if (key && !same_filter(e, weight)) continue;  // changed since: the new pack replaces it
    if (key) hit = e.packed;
    kept.push_back(std::move(e));
  }
  g_entries = std::move(kept);
  if (hit.defined()) {
    ++g_hits;
    // The copy may have been made on another stream: the caching allocator must not hand its
    // memory out again (after an eviction) before this stream's kernels have read it.
    if (hit.is_cuda())
      c10::cuda::CUDACachingAllocator::recordStream(hit.storage().data_ptr(),
                                                    c10::cuda::getCurrentCUDAStream(hit.device().index()));
    return {hit, true, true};
  }
  ++g_misses;
  Tensor packed = pack(source, layout, groups, pad_to);
  if (g_entries.size() >= kMaxEntries) g_entries.erase(g_entries.begin());
  g_entries.push_back(Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()), impl, layout, groups,
                            pad_to, weight._version(), weight.data_ptr(), weight.sizes().vec(), weight.strides().vec(),
                            weight.scalar_type(), packed});
  return {packed, false, true};
}

std::tuple<Tensor, bool, bool> packed_filter_op(const Tensor& weight, int64_t layout, int64_t groups, int64_t pad_to) {
  const char* op = "resconv::cuda_packed_filter";
  check_dim(weight, 4, op, "weight", "[K, C/groups, R, S]");
  TORCH_CHECK_VALUE(layout == 0 || layout == 1, op, ": layout: expected 0 (KRSC) or 1 (GRSCK), got ", layout);
  TORCH_CHECK_VALUE(groups >= 1 && weight.size(0) % groups == 0, op, ": groups: expected a positive divisor of K = ",
                    weight.size(0), ", got ", groups);
  TORCH_CHECK_VALUE(pad_to >= 1 && (layout == 0 || pad_to == 1), op,
                    ": pad_to: expected 1, or a positive multiple for layout 0 (KRSC), got ", pad_to);
  const PackedFilter pf = packed_filter(weight, static_cast<FilterLayout>(layout), groups, pad_to);
  return {pf.t.detach().clone(at::MemoryFormat::Preserve), pf.cache_hit, aligned16(pf.t)};
}

FilterCacheStats filter_cache_stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {g_hits, g_misses, static_cast<int64_t>(g_entries.size())};
}

void filter_cache_clear() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_entries.clear();
  g_hits = g_misses = 0;
}

}  // namespace resconv
