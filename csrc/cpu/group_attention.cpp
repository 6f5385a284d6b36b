// CPU group_attention: attention whose output is split by key group (VAR's pass; the spec:
// vtattn/reference/group_attention.py). A task per (batch, query head, query row): its logits in chunks
// of kBN keys (dot products), an online softmax over every key the row sees, each key's probability and
// value added to its group's accumulator (a key is in at most one group: one pass, not one per group);
// out and mass are then divided by the row's whole sum. Where the torch backend's chunked matmuls carry
// G x D + G + 1 columns per key, this reads each value row once.
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

template <typename T>
void group_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& groups, int64_t G,
                  bool causal, float scale, at::Tensor& out, at::Tensor& mass) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t rep = Hq / k.size(1), Nk = k.size(2), off = Nk - Nq;
  const int64_t* gp = groups.const_data_ptr<int64_t>();
  const int64_t gs0 = groups.stride(0), gs1 = groups.stride(1);
  float* out_p = out.data_ptr<float>();  // [B, Nq, Hq, G, D] memory (token-major)
  float* mass_p = mass.data_ptr<float>();  // [B, Hq, Nq, G]
  at::parallel_for(0, B * Hq * Nq, grain_for(2 * Nk * D), [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(D), x(4 * D), s(kBN), acc(G * D), ms(G);
    std::vector<int64_t> seen(kBN);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t i = task % Nq, bh = task / Nq, b = bh / Hq, h = bh % Hq;
      const int64_t end = causal ? std::clamp<int64_t>(i + off + 1, 0, Nk) : Nk;
      const Slice<T> qs(q, b, h), ks(k, b, h / rep), vs(v, b, h / rep);
      const int64_t* grp = gp + b * gs0;
      load_rows(qs, 1, 1, [&](int64_t) { return i; }, D, D, scale, qf.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(ms.begin(), ms.end(), 0.f);
      float m = kNegInf, l = 0.f;
      for (int64_t j0 = 0; j0 < end; j0 += kBN) {
        // the chunk's keys the row sees (group -1: none does, and its key and value are never read)
        int64_t n = 0;
        for (int64_t j = j0; j < std::min(end, j0 + kBN); ++j)
          if (grp[j * gs1] >= 0) seen[n++] = j;
        if (n == 0) continue;
        logits(qf.data(), 1, ks, [&](int64_t j) { return seen[j]; }, n, D, x.data(), s.data(), kBN);
        float top = kNegInf;
        for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
        if (top > m) {  // a new maximum: what was summed so far shrinks by exp(m - top) (0 from -inf)
          const float alpha = std::exp(m - top);
          for (float& a : acc) a *= alpha;
          for (float& a : ms) a *= alpha;
          l *= alpha;
          m = top;
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t g = grp[seen[j] * gs1];
          const float p = std::exp(s[j] - m);
          l += p;
          if (g >= G) continue;  // (outside every group: in the row's sum only, as the reference)
          ms[g] += p;
          axpy(p, row_f32(vs, seen[j], D, x.data()), acc.data() + g * D, D);
        }
      }
      const float inv = l == 0.f ? 0.f : 1.f / l;  // a row that sees no key: 0 (a NaN sum stays NaN)
      float* o = out_p + ((b * Nq + i) * Hq + h) * G * D;
      for (int64_t c = 0; c < G * D; ++c) o[c] = acc[c] * inv;
      float* w = mass_p + ((b * Hq + h) * Nq + i) * G;
      for (int64_t g = 0; g < G; ++g) w[g] = ms[g] * inv;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> group_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& groups, int64_t num_groups, bool causal,
                                                       double scale) {
  check_qk("vtattn group_attention", q, k);
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == q.scalar_type() && v.sizes() == k.sizes(),
              "vtattn group_attention: v must be a CPU tensor of k's shape ", k.sizes(), " and q's dtype ",
              q.scalar_type(), ", got ", v.sizes(), " ", v.scalar_type(), " on ", v.device());
  TORCH_CHECK(groups.device().is_cpu() && groups.scalar_type() == at::kLong && groups.dim() == 2 &&
                  groups.size(0) == k.size(0) && groups.size(1) == k.size(2),
              "vtattn group_attention: groups must be a CPU int64 [B, Nk] = [", k.size(0), ", ", k.size(2),
              "] tensor, got ", groups.scalar_type(), " ", groups.sizes(), " on ", groups.device());
  TORCH_CHECK(num_groups >= 1, "vtattn group_attention: num_groups must be >= 1, got ", num_groups);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  auto out = at::empty({B, Nq, Hq, num_groups, D}, q.options().dtype(at::kFloat)).transpose(1, 2);
  auto mass = at::empty({B, Hq, Nq, num_groups}, q.options().dtype(at::kFloat));
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_group_attention_cpu", [&] {
    group_kernel<scalar_t>(q, k, v, groups, num_groups, causal, static_cast<float>(scale), out, mass);
  });
  return {out, mass};
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("group_attention", &vtattn::cpu::group_attention_cpu); }
