// CPU segmented top-k: one task per (sample, segment). A segment's tokens are ranked by a
// composite 64-bit key (score key, then lower index), which is a strict total order, so
// nth_element partitions off exactly the kept tokens and the result is deterministic.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"
#include "score_key.h"

namespace vtattn::cpu {
namespace {

template <typename T>
void select_kernel(const at::Tensor& scores, const at::Tensor& budgets, const std::vector<int64_t>& offsets,
                   bool sort, at::Tensor& indices, at::Tensor& mask, at::Tensor& counts) {
  const int64_t B = scores.size(0), S = offsets.size() - 1, K = indices.size(1);
  const T* sp = scores.const_data_ptr<T>();
  const int64_t* bp = budgets.const_data_ptr<int64_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t ssb = scores.stride(0), ssn = scores.stride(1), sbb = budgets.stride(0), sbs = budgets.stride(1);
  auto budget = [&](int64_t b, int64_t s) {  // clamped to the segment: memory safety on any input
    return std::clamp<int64_t>(bp[b * sbb + s * sbs], 0, offsets[s + 1] - offsets[s]);
  };

  at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> ranked;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / S, s = task % S, start = offsets[s], len = offsets[s + 1] - start;
      int64_t out = 0;  // output slot of the segment's first kept token
      for (int64_t t = 0; t < s; ++t) out += budget(b, t);
      const int64_t k = budget(b, s), total = out + k;
      bool* m = mp + b * mask.stride(0) + start;
      std::fill(m, m + len, false);
      // Larger composite = ranks higher: score key in the high half, inverted index in the low half.
      ranked.resize(len);
      for (int64_t i = 0; i < len; ++i)
        ranked[i] = uint64_t(score_key(static_cast<float>(sp[b * ssb + (start + i) * ssn]))) << 32 |
                    (0xffffffffu - uint32_t(i));
      auto higher = std::greater<uint64_t>();
      std::nth_element(ranked.begin(), ranked.begin() + k, ranked.end(), higher);
      for (int64_t r = 0; r < k; ++r) m[0xffffffffu - uint32_t(ranked[r])] = true;
      int64_t* idx = ip + b * K;
      if (sort) {
        for (int64_t i = 0; i < len && out < K; ++i)
          if (m[i]) idx[out++] = start + i;
      } else {
        std::sort(ranked.begin(), ranked.begin() + k, higher);
        for (int64_t r = 0; r < k && out < K; ++r) idx[out++] = start + (0xffffffffu - uint32_t(ranked[r]));
      }
      if (s == S - 1) {  // the sample's last segment: its total and the -1 tail
        cp[b] = total;
        std::fill(idx + std::min(total, K), idx + K, -1);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tokens_cpu(const at::Tensor& scores, const at::Tensor& budgets,
                                                                 at::IntArrayRef segments, int64_t max_keep,
                                                                 bool sort) {
  TORCH_CHECK(scores.device().is_cpu() && budgets.device().is_cpu(), "select_tokens: tensors must be on the CPU");
  TORCH_CHECK(scores.dim() == 2, "select_tokens: scores must be [B, N], got ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "select_tokens: scores must be floating, got ",
              scores.scalar_type());
  const int64_t B = scores.size(0), N = scores.size(1), S = segments.size();
  TORCH_CHECK(budgets.scalar_type() == at::kLong && budgets.dim() == 2 && budgets.size(0) == B &&
                  budgets.size(1) == S,
              "select_tokens: budgets must be int64 [B, S] = [", B, ", ", S, "], got ", budgets.scalar_type(), " ",
              budgets.sizes());
  TORCH_CHECK(N < (int64_t(1) << 32), "select_tokens: N must be < 2^32");
  std::vector<int64_t> offsets{0};
  for (int64_t n : segments) {
    TORCH_CHECK(n >= 0, "select_tokens: segment lengths must be >= 0, got ", n);
    offsets.push_back(offsets.back() + n);
  }
  TORCH_CHECK(S > 0 && offsets.back() == N, "select_tokens: segments must sum to N = ", N);
  TORCH_CHECK(max_keep >= 0 && max_keep <= N, "select_tokens: max_keep must be in [0, N], got ", max_keep);

  auto indices = at::empty({B, max_keep}, scores.options().dtype(at::kLong));
  auto mask = at::empty({B, N}, scores.options().dtype(at::kBool));
  auto counts = at::empty({B}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "vtattn_select_tokens_cpu", [&] {
    select_kernel<scalar_t>(scores, budgets, offsets, sort, indices, mask, counts);
  });
  return {indices, mask, counts};
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("select_tokens", &vtattn::cpu::select_tokens_cpu); }
