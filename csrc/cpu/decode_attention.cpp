// CPU decode attention over a per-(batch, kv head) variable-length cache, dense or paged: one
// task per (batch, kv head) handles its whole GQA group, so each K/V row is converted to fp32 once
// and used by every query head of the group. Logits of the valid prefix go to scratch, then an
// exact softmax and one pass over V; all arithmetic is fp32 (docs/internals.md). The two cache
// layouts differ only in where key j of (b, g) lives: `rows_of(b, g)` gives that mapping.
#include <torch/library.h>

#include <utility>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

// Rows of one (b, g) of a page pool [num_pages, page_size, D]: key j is in page table[j / page_size].
template <typename T>
struct PagedRows {
  const T* base;
  const int32_t* table;  // block_table[b, g, :]
  int64_t table_stride, page_size, sp, sn, sd;
  const T* row(int64_t j) const {
    return base + table[(j / page_size) * table_stride] * sp + (j % page_size) * sn;
  }
};

template <typename T>
PagedRows<T> paged_rows(const at::Tensor& pool, const at::Tensor& table, int64_t b, int64_t g) {
  return {pool.const_data_ptr<T>(), table.const_data_ptr<int32_t>() + b * table.stride(0) + g * table.stride(1),
          table.stride(2), pool.size(1), pool.stride(0), pool.stride(1), pool.stride(2)};
}

// RowsOf(b, g) -> (k rows, v rows): objects with row(j) and sd, as Slice<T>. The dot products and
// axpys are the multiversioned ones of common.h (AVX-512 / AVX2 where the CPU has them).
template <typename T, typename RowsOf>
void decode_kernel(const at::Tensor& q, int64_t Hkv, const at::Tensor& lengths, int64_t max_len, float scale,
                   RowsOf rows_of, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), group = Hq / Hkv;
  const int32_t* len_p = lengths.const_data_ptr<int32_t>();
  T* out_p = out.data_ptr<T>();
  const TileOps& ops = tile_ops();

  at::parallel_for(0, B * Hkv, grain_for(2 * group * max_len * D), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), rows(4 * D), s, acc(group * D), inv(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t n = len_p[b * lengths.stride(0) + g * lengths.stride(1)];
      const auto [ks, vs] = rows_of(b, g);
      for (int64_t r = 0; r < group; ++r) {
        const T* x = q.const_data_ptr<T>() + b * q.stride(0) + (g * group + r) * q.stride(1);
        for (int64_t c = 0; c < D; ++c) qf[r * D + c] = scale * static_cast<float>(x[c * q.stride(3)]);
      }
      // each head's logits in a row of whole kBN tiles (the tile operations read whole tiles)
      const int64_t ns = round_up(std::max<int64_t>(n, 1), kBN);
      s.resize(group * ns);
      logits(qf.data(), group, ks, [](int64_t j) { return j; }, n, D, rows.data(), s.data(), ns);
      // Exact softmax per query head (the vectorised exp of the tile operations); a head with n == 0
      // keeps inv 0 and outputs zeros.
      std::fill(inv.begin(), inv.end(), 0.f);
      for (int64_t r = 0; r < group && n > 0; ++r) {
        float* sr = s.data() + r * ns;
        float mx = kNegInf, sum = 0.f;
        for (int64_t j0 = 0; j0 < n; j0 += kBN) mx = std::max(mx, ops.max_of(sr + j0, 0, std::min(kBN, n - j0)));
        for (int64_t j0 = 0; j0 < n; j0 += kBN) sum += ops.exp_shift_sum(sr + j0, 0, std::min(kBN, n - j0), mx);
        inv[r] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* x = row_f32(vs, j, D, rows.data());
        for (int64_t r = 0; r < group; ++r) axpy(s[r * ns + j], x, &acc[r * D], D);
      }
      for (int64_t r = 0; r < group; ++r) {
        T* o = out_p + (b * Hq + g * group + r) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(acc[r * D + c] * inv[r]);
      }
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lengths, double scale) {
  constexpr const char* op = "vtattn decode_attention";
  check_qk(op, q, k_cache);
  TORCH_CHECK(q.size(2) == 1, op, ": q must be [B, Hq, 1, D], got shape ", q.sizes());
  TORCH_CHECK(v_cache.device().is_cpu() && v_cache.scalar_type() == q.scalar_type() &&
                  v_cache.sizes() == k_cache.sizes(),
              op, ": v_cache must be a CPU tensor of q's dtype and k_cache's shape ", k_cache.sizes());
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kInt && lengths.dim() == 2 &&
                  lengths.size(0) == k_cache.size(0) && lengths.size(1) == k_cache.size(1),
              op, ": lengths must be a CPU int32 [B, Hkv] tensor, got ", lengths.scalar_type(), " ",
              lengths.sizes());
  // Memory safety: the kernel reads cache rows [0, length).
  const auto len = lengths.accessor<int32_t, 2>();
  for (int64_t b = 0; b < len.size(0); ++b)
    for (int64_t g = 0; g < len.size(1); ++g)
      TORCH_CHECK(len[b][g] >= 0 && len[b][g] <= k_cache.size(2), op, ": lengths[", b, ", ", g, "] = ", len[b][g],
                  " is outside [0, L_cap=", k_cache.size(2), "]");

  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_decode_attention_cpu", [&] {
    decode_kernel<scalar_t>(q, k_cache.size(1), lengths, k_cache.size(2), static_cast<float>(scale),
                            [&](int64_t b, int64_t g) {
      return std::pair{Slice<scalar_t>(k_cache, b, g), Slice<scalar_t>(v_cache, b, g)};
    }, out);
  });
  return out;
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                      const at::Tensor& block_table, const at::Tensor& lengths, double scale) {
  constexpr const char* op = "vtattn paged_decode_attention";
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 4 && q.size(2) == 1, op,
              ": q must be a CPU [B, Hq, 1, D] tensor, got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  for (const auto* t : {&k_pages, &v_pages})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->dim() == 3 &&
                    t->sizes() == k_pages.sizes() && t->size(1) > 0 && t->size(2) == q.size(3),
                op, ": k_pages and v_pages must be CPU [num_pages, page_size > 0, D] pools of q's dtype, got ",
                k_pages.sizes(), " and ", v_pages.sizes());
  TORCH_CHECK(block_table.device().is_cpu() && block_table.scalar_type() == at::kInt && block_table.dim() == 3 &&
                  block_table.size(0) == q.size(0) && block_table.size(1) > 0 &&
                  q.size(1) % block_table.size(1) == 0,
              op, ": block_table must be a CPU int32 [B, Hkv, max_pages] tensor with Hq a multiple of Hkv, got ",
              block_table.scalar_type(), " ", block_table.sizes());
  const int64_t B = q.size(0), Hkv = block_table.size(1), num_pages = k_pages.size(0), page = k_pages.size(1);
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kInt && lengths.dim() == 2 &&
                  lengths.size(0) == B && lengths.size(1) == Hkv,
              op, ": lengths must be a CPU int32 [B, Hkv] tensor, got ", lengths.scalar_type(), " ", lengths.sizes());
  // Memory safety: the kernel reads rows [0, length) through the table's first ceil(length / page) entries.
  const auto len = lengths.accessor<int32_t, 2>();
  const auto table = block_table.accessor<int32_t, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      TORCH_CHECK(len[b][g] >= 0 && len[b][g] <= table.size(2) * page, op, ": lengths[", b, ", ", g, "] = ",
                  len[b][g], " is outside [0, max_pages * page_size=", table.size(2) * page, "]");
      for (int64_t i = 0; i < ceil_div(len[b][g], page); ++i)
        TORCH_CHECK(table[b][g][i] >= 0 && table[b][g][i] < num_pages, op, ": block_table[", b, ", ", g, ", ", i,
                    "] = ", table[b][g][i], " is outside [0, num_pages=", num_pages, ")");
    }

  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_paged_decode_attention_cpu", [&] {
    decode_kernel<scalar_t>(q, Hkv, lengths, table.size(2) * page, static_cast<float>(scale),
                            [&](int64_t b, int64_t g) {
      return std::pair{paged_rows<scalar_t>(k_pages, block_table, b, g),
                       paged_rows<scalar_t>(v_pages, block_table, b, g)};
    }, out);
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) {
  m.impl("decode_attention", &vtattn::cpu::decode_attention_cpu);
  m.impl("paged_decode_attention", &vtattn::cpu::paged_decode_attention_cpu);
}
