// CPU paged_append: a decode step's keys and values written into a paged cache in one call (the
// index_copy / fill / add ops of kv.pages.Pages.append fused). A pure copy: rows move as bytes.
#include <torch/library.h>

#include <cstring>
#include <optional>

#include "common.h"

namespace vtattn::cpu {
namespace {

void check_heads(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t B, int64_t H) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == B && t.size(1) == H,
              "paged_append: ", name, " must be a CPU ", dtype, " [", B, ", ", H, "] tensor, got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
}

void check_slots(const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Tensor& pool) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == pool.size(0) &&
                  t.size(1) == pool.size(1),
              "paged_append: ", name, " must be a CPU ", dtype, " tensor of the pools' [P, page_size], got ",
              t.scalar_type(), " ", t.sizes());
}

// Copies one row of `d` elements of `size` bytes between strided rows (unit strides: one memcpy).
inline void copy_row(char* dst, int64_t dst_step, const char* src, int64_t src_step, int64_t d, int64_t size) {
  if (dst_step == size && src_step == size) {
    std::memcpy(dst, src, d * size);
    return;
  }
  for (int64_t c = 0; c < d; ++c) std::memcpy(dst + c * dst_step, src + c * src_step, size);
}

void paged_append_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
                      const at::Tensor& next_slot, const at::Tensor& lengths, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& start, const std::optional<at::Tensor>& last,
                      const std::optional<at::Tensor>& score) {
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "paged_append: k and v must be [B, H, n, D] of one shape, got ",
              k.sizes(), " and ", v.sizes());
  const int64_t B = k.size(0), H = k.size(1), n = k.size(2), D = k.size(3);
  for (const auto* t : {&k_pages, &v_pages, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == k_pages.scalar_type(),
                "paged_append: k_pages, v_pages, k and v must be CPU tensors of one dtype, got ", t->scalar_type(),
                " on ", t->device());
  TORCH_CHECK(k_pages.dim() == 3 && v_pages.sizes() == k_pages.sizes() && k_pages.size(2) == D,
              "paged_append: k_pages and v_pages must be [P, page_size, D] with k's D, got ", k_pages.sizes(), " and ",
              v_pages.sizes());
  check_slots("pos", pos, at::kLong, k_pages);
  if (score) check_slots("score", *score, at::kFloat, k_pages);
  check_heads("next_slot", next_slot, at::kLong, B, H);
  check_heads("lengths", lengths, at::kInt, B, H);
  if (last) check_heads("last", *last, at::kLong, B, H);
  TORCH_CHECK(start.dim() == 0 && start.scalar_type() == at::kLong && start.device().is_cpu(),
              "paged_append: start must be a CPU int64 0-dim tensor, got ", start.scalar_type(), " ", start.sizes());
  const int64_t ps = k_pages.size(1), slots = k_pages.size(0) * ps, size = k.element_size();
  const int64_t first = *start.const_data_ptr<int64_t>();  // (checked above: no item() dispatch, ~2 us a call)
  int64_t* nx = next_slot.data_ptr<int64_t>();
  int32_t* ln = lengths.data_ptr<int32_t>();
  const int64_t* lt = last ? last->const_data_ptr<int64_t>() : nullptr;
  const int64_t snb = next_slot.stride(0), snh = next_slot.stride(1), sgb = lengths.stride(0),
                sgh = lengths.stride(1);
  const int64_t slb = lt ? last->stride(0) : 0, slh = lt ? last->stride(1) : 0;
  // Validate every slot before writing any: a bad one raises with the cache untouched.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H && n > 0; ++h) {
      const int64_t s0 = nx[b * snb + h * snh], cap = lt ? lt[b * slb + h * slh] : s0 + n;
      const int64_t lo = std::min(s0, cap), hi = std::min(s0 + n - 1, cap);
      TORCH_CHECK(lo >= 0 && hi < slots, "paged_append: head (", b, ", ", h, ") writes slots ", lo, "..", hi,
                  " outside the pools' ", slots);
    }
  const at::Tensor* pools[2] = {&k_pages, &v_pages};
  const at::Tensor* rows[2] = {&k, &v};
  int64_t* pp = pos.data_ptr<int64_t>();
  float* sp = score ? score->data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H, s0 = nx[b * snb + h * snh];
      const int64_t cap = lt ? lt[b * slb + h * slh] : s0 + n;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t s = std::min(s0 + t, cap), src = s0 + t >= cap ? n - 1 : t;  // clamped: the newest token
        const int64_t page = s / ps, row = s % ps;
        for (int i = 0; i < 2; ++i) {
          const at::Tensor &pool = *pools[i], &x = *rows[i];
          char* dst = static_cast<char*>(pool.data_ptr()) + (page * pool.stride(0) + row * pool.stride(1)) * size;
          const char* from = static_cast<const char*>(x.const_data_ptr()) +
                             (b * x.stride(0) + h * x.stride(1) + src * x.stride(2)) * size;
          copy_row(dst, pool.stride(2) * size, from, x.stride(3) * size, D, size);
        }
        pp[page * pos.stride(0) + row * pos.stride(1)] = first + src;
        if (sp) sp[page * score->stride(0) + row * score->stride(1)] = 0.f;
      }
      nx[b * snb + h * snh] = s0 + n;  // each head's counters belong to this iteration alone
      ln[b * sgb + h * sgh] += static_cast<int32_t>(n);
    }
  });
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("paged_append", &vtattn::cpu::paged_append_cpu); }
