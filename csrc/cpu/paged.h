// Pieces shared by the kernels of kv.pages.Pages' pools (paged_evict, paged_evict_step): slot
// addressing, a head's key rows for the tile code, and the scaled fp32 query rows of one kv head.
#pragma once

#include <tuple>

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

// A paged cache's pools as a kernel writes them: element pointers and slot addressing.
template <typename T>
struct Pools {
  T *k, *v;
  int64_t* pos;
  float* score;
  SlotOf kat, vat, pat, sat;
  Pools(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_, const at::Tensor& score_)
      : k(k_pages.data_ptr<T>()), v(v_pages.data_ptr<T>()), pos(pos_.data_ptr<int64_t>()),
        score(score_.data_ptr<float>()), kat(k_pages), vat(v_pages), pat(pos_), sat(score_) {}
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

// The pools of a paged cache as the kernels read them: k / v CPU [P, page_size, D] of one dtype with unit last
// stride, pos int64 and score fp32 [P, page_size]; messages name `op` and the argument.
inline void check_pools(const char* op, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
                        const at::Tensor& score) {
  TORCH_CHECK(k_pages.device().is_cpu() && v_pages.device().is_cpu() && k_pages.dim() == 3 &&
                  v_pages.sizes() == k_pages.sizes() && v_pages.scalar_type() == k_pages.scalar_type() &&
                  k_pages.stride(2) == 1 && v_pages.stride(2) == 1,
              op, ": k_pages and v_pages must be CPU [P, page_size, D] pools of one dtype with unit last stride, got ",
              k_pages.sizes(), " and ", v_pages.sizes());
  for (const auto& [name, t, dtype] :
       {std::tuple<const char*, const at::Tensor&, at::ScalarType>{"pos", pos, at::kLong},
        {"score", score, at::kFloat}})
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == k_pages.size(0) &&
                    t.size(1) == k_pages.size(1),
                op, ": ", name, " must be a CPU ", dtype, " tensor of the pools' [P, page_size], got ",
                t.scalar_type(), " ", t.sizes());
}

}  // namespace
}  // namespace vtattn::cpu
