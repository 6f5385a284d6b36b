// Pieces shared by the kernels of kv.pages.Pages' pools (paged_evict, paged_evict_step): slot
// addressing, a head's key rows for the tile code, and the scaled fp32 query rows of one kv head.
#pragma once

#include "common.h"

namespace vtattn::cpu {
namespace {

// Slot s of a [P, page_size, ...] pool: row s % page_size of page s / page_size, at this element
// offset; s * sr where pages follow each other (Pages' pools: no division per access).
struct SlotOf {
  int64_t ps, sp, sr;
  bool linear;
  SlotOf(const at::Tensor& pool) : ps(pool.size(1)), sp(pool.stride(0)), sr(pool.stride(1)), linear(sp == ps * sr) {}
  int64_t operator()(int64_t s) const { return linear ? s * sr : s / ps * sp + s % ps * sr; }
};

// One head's key rows for row_f32: token t is slot first + t of the pool (unit last stride).
template <typename T>
struct HeadRows {
  const T* base;
  SlotOf at;
  int64_t first;
  static constexpr int64_t sd = 1;
  const T* row(int64_t t) const { return base + at(first + t); }
};

// The G * n query rows of kv head h of batch b, scaled, as fp32 rows of D (any strides, any float dtype).
template <typename Q>
void load_queries(const at::Tensor& q, int64_t b, int64_t h, int64_t G, float scale, float* out) {
  const int64_t n = q.size(2), D = q.size(3);
  const Q* base = q.const_data_ptr<Q>() + b * q.stride(0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < n; ++i) {
      const Q* x = base + (h * G + g) * q.stride(1) + i * q.stride(2);
      float* y = out + (g * n + i) * D;
      for (int64_t c = 0; c < D; ++c) y[c] = scale * static_cast<float>(x[c * q.stride(3)]);
    }
}
using LoadQueries = void (*)(const at::Tensor&, int64_t, int64_t, int64_t, float, float*);

}  // namespace
}  // namespace vtattn::cpu
