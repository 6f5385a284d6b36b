// CPU decode attention over a per-(batch, kv head) variable-length cache: one task per (batch,
// kv head) handles its whole GQA group, so each K/V row is converted to fp32 once and used by
// every query head of the group. Logits of the valid prefix go to scratch, then an exact softmax
// and one pass over V; all arithmetic is fp32 (docs/internals.md).
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                   float scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), group = Hq / Hkv;
  const int32_t* len_p = lengths.const_data_ptr<int32_t>();
  T* out_p = out.data_ptr<T>();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), row(D), s, acc(group * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t n = len_p[b * lengths.stride(0) + g * lengths.stride(1)];
      const Slice<T> ks(k, b, g), vs(v, b, g);
      for (int64_t r = 0; r < group; ++r) {
        const T* x = q.const_data_ptr<T>() + b * q.stride(0) + (g * group + r) * q.stride(1);
        for (int64_t c = 0; c < D; ++c) qf[r * D + c] = scale * static_cast<float>(x[c * q.stride(3)]);
      }
      s.assign(group * n, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* x = ks.row(j);
        for (int64_t c = 0; c < D; ++c) row[c] = static_cast<float>(x[c * ks.sd]);
        for (int64_t r = 0; r < group; ++r) {
          float dot = 0.f;
          for (int64_t c = 0; c < D; ++c) dot += qf[r * D + c] * row[c];
          s[r * n + j] = dot;
        }
      }
      // Exact softmax per query head; a head with n == 0 keeps sum 0 and outputs zeros.
      std::vector<float> inv(group, 0.f);
      for (int64_t r = 0; r < group; ++r) {
        float* sr = s.data() + r * n;
        float mx = kNegInf, sum = 0.f;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
        for (int64_t j = 0; j < n; ++j) sum += (sr[j] = std::exp(sr[j] - mx));
        if (n > 0) inv[r] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* x = vs.row(j);
        for (int64_t c = 0; c < D; ++c) row[c] = static_cast<float>(x[c * vs.sd]);
        for (int64_t r = 0; r < group; ++r) {
          const float p = s[r * n + j];
          for (int64_t c = 0; c < D; ++c) acc[r * D + c] += p * row[c];
        }
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
    decode_kernel<scalar_t>(q, k_cache, v_cache, lengths, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("decode_attention", &vtattn::cpu::decode_attention_cpu); }
