// CPU token merge. Pass 1 (per pruned token): the kept token whose key has the highest cosine
// similarity, from fp32 normalised kept keys (an [B, K, Ck] buffer, never [N, K]). Pass 2 (per
// kept slot): its own row plus its assigned rows in token order, so sums are deterministic.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

constexpr float kNormEps = 1e-12f;  // F.normalize's clamp: a zero key has cosine 0 with everything

template <typename K>
void load_unit(const K* src, int64_t stride, int64_t n, float* dst) {
  float sq = 0.f;
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = static_cast<float>(src[c * stride]);
    sq += dst[c] * dst[c];
  }
  const float inv = 1.f / std::max(std::sqrt(sq), kNormEps);
  for (int64_t c = 0; c < n; ++c) dst[c] *= inv;
}

// assign[b, i]: the kept token index pruned token i folds into (-1: none), weight[b, i] its weight.
template <typename K>
void assign_kernel(const at::Tensor& keys, const at::Tensor& indices, const at::Tensor& mask, bool weighted,
                   int64_t* assign, float* weight) {
  const int64_t B = keys.size(0), N = keys.size(1), D = keys.size(2), S = indices.size(1);
  const K* kp = keys.const_data_ptr<K>();
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  const bool* mp = mask.const_data_ptr<bool>();
  std::vector<float> kept(B * S * D);
  at::parallel_for(0, B * S, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / S, idx = ip[b * indices.stride(0) + (t % S) * indices.stride(1)];
      if (idx >= 0 && idx < N)
        load_unit(kp + b * keys.stride(0) + idx * keys.stride(1), keys.stride(2), D, &kept[t * D]);
    }
  });
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / N, i = t % N;
      int64_t best = -1;
      float best_cos = kNegInf;
      if (!mp[b * mask.stride(0) + i * mask.stride(1)]) {
        load_unit(kp + b * keys.stride(0) + i * keys.stride(1), keys.stride(2), D, q.data());
        for (int64_t s = 0; s < S; ++s) {
          const int64_t idx = ip[b * indices.stride(0) + s * indices.stride(1)];
          if (idx < 0 || idx >= N) continue;
          const float dot = dot_fixed_order(q.data(), &kept[(b * S + s) * D], D);
          // A NaN similarity ranks below every number: a NaN / inf key moves no other token.
          const float rank = std::isnan(dot) ? kNegInf : dot;
          if (best < 0 || rank > best_cos || (rank == best_cos && idx < best)) best = idx, best_cos = rank;
        }
      }
      assign[t] = best;
      // best_cos is -inf only when every similarity was NaN (cosines are >= -1): the weight is NaN then.
      const float cos = best_cos == kNegInf ? std::numeric_limits<float>::quiet_NaN() : best_cos;
      weight[t] = best < 0 ? 0.f : weighted ? std::max(cos, 0.f) : 1.f;
    }
  });
}

template <typename T>
void reduce_kernel(const at::Tensor& x, const at::Tensor& indices, const int64_t* assign, const float* weight,
                   at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), S = indices.size(1);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  auto row = [&](int64_t b, int64_t i) { return xp + b * x.stride(0) + i * x.stride(1); };
  at::parallel_for(0, B * S, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / S, idx = ip[b * indices.stride(0) + (t % S) * indices.stride(1)];
      T* o = op + t * C;
      if (idx < 0 || idx >= N) {
        std::fill(o, o + C, T(0));
        continue;
      }
      const T* xc = row(b, idx);
      for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<float>(xc[c * x.stride(2)]);
      float wsum = 1.f;
      for (int64_t i = 0; i < N; ++i) {
        if (assign[b * N + i] != idx) continue;
        const float w = weight[b * N + i];
        const T* xi = row(b, i);
        for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<float>(xi[c * x.stride(2)]);
        wsum += w;
      }
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(acc[c] / wsum);
    }
  });
}

at::Tensor merge_tokens_cpu(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& indices,
                            const at::Tensor& mask, bool weighted) {
  for (const auto& t : {x, keys, indices, mask})
    TORCH_CHECK(t.device().is_cpu(), "merge_tokens: tensors must be on the CPU, got ", t.device());
  TORCH_CHECK(x.dim() == 3 && keys.dim() == 3 && keys.size(0) == x.size(0) && keys.size(1) == x.size(1),
              "merge_tokens: x must be [B, N, C] and keys [B, N, Ck], got ", x.sizes(), " and ", keys.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(keys.scalar_type()),
              "merge_tokens: x and keys must be floating");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == x.size(0),
              "merge_tokens: indices must be int64 [B, K], got ", indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == x.size(0) &&
                  mask.size(1) == x.size(1),
              "merge_tokens: mask must be bool [B, N], got ", mask.scalar_type(), " ", mask.sizes());
  const int64_t B = x.size(0), N = x.size(1);
  auto assign = at::empty({B, N}, indices.options());
  auto weight = at::empty({B, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "vtattn_merge_assign_cpu", [&] {
    assign_kernel<scalar_t>(keys, indices, mask, weighted, assign.data_ptr<int64_t>(), weight.data_ptr<float>());
  });
  auto out = at::empty({B, indices.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vtattn_merge_reduce_cpu", [&] {
    reduce_kernel<scalar_t>(x, indices, assign.const_data_ptr<int64_t>(), weight.const_data_ptr<float>(), out);
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("merge_tokens", &vtattn::cpu::merge_tokens_cpu); }
