// CPU varlen attention forward: the flash-style loop of attention.cpp run per
// (sequence, head, block of kBM query rows) of packed [T, H, D] tensors, each
// sequence a row range given by cu_seqlens. Tasks past a sequence's end are
// empty (the task grid is sized by the longest sequence).
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

template <typename T>
void varlen_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* cq,
                   const int32_t* ck, int64_t B, int64_t longest, const Opts& o, at::Tensor& out,
                   at::Tensor& lse) {
  // [1, H, T, D] views so that Slice reads one head's packed rows.
  const at::Tensor q4 = q.unsqueeze(0).transpose(1, 2), k4 = k.unsqueeze(0).transpose(1, 2),
                   v4 = v.unsqueeze(0).transpose(1, 2);
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2), group = Hq / k.size(1);
  const int64_t dp = round_up(D, kLanes), nblk = ceil_div(longest, kBM);
  const TileOps& ops = tile_ops();
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, B * Hq * nblk, 1, [&](int64_t begin, int64_t end) {
    BlockScratch w(dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nblk, bh = task / nblk, b = bh / Hq, h = bh % Hq;
      const int64_t q0 = cq[b], Nq = cq[b + 1] - q0, k0 = ck[b], Nk = ck[b + 1] - k0;
      const int64_t i0 = blk * kBM;
      if (i0 >= Nq) continue;
      const int64_t m = std::min(kBM, Nq - i0), mp = round_up(m, kRowGroup);
      const Slice<T> qs(q4, 0, h), ks(k4, 0, h / group), vs(v4, 0, h / group);
      load_rows(qs, m, mp, [&](int64_t r) { return q0 + i0 + r; }, D, dp, o.scale, w.qb.data());
      attend_block(ops, ks, vs, k0, i0, m, mp, Nq, Nk, o, D, dp, w);
      const float sink = o.sink(h);

      for (int64_t r = 0; r < m; ++r) {
        const int64_t row = q0 + i0 + r;
        T* out_row = out_p + (row * Hq + h) * D;
        const float inv = w.stats[r].norm(sink);  // no keys: 0, lse -inf or the sink
        for (int64_t c = 0; c < D; ++c) out_row[c] = static_cast<T>(w.acc[r * dp + c] * inv);
        lse_p[h * Tq + row] = w.stats[r].lse(sink);
      }
    }
  });
}

// cu_seqlens must be a valid partition of [0, total): the kernel indexes with it.
int64_t check_cu(const char* name, const at::Tensor& cu, int64_t B, int64_t total) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() == B + 1,
              "vtattn varlen_attention: ", name, " must be a CPU int32 [B + 1] tensor, got ", cu.scalar_type(), " ",
              cu.sizes(), " on ", cu.device());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  int64_t longest = 0;
  TORCH_CHECK(p[0] == 0 && p[B] == total, "vtattn varlen_attention: ", name, " must run from 0 to ", total);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b + 1] >= p[b], "vtattn varlen_attention: ", name, " must be non-decreasing");
    longest = std::max<int64_t>(longest, p[b + 1] - p[b]);
  }
  return longest;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& cu_q,
                                                        const at::Tensor& cu_k, int64_t max_seqlen_q, bool causal,
                                                        double scale, double softcap, int64_t window,
                                                        const std::optional<at::Tensor>& sinks) {
  // The 4-D checks of attention on [1, H, T, D] views.
  check_qk("vtattn varlen_attention", q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2));
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == q.scalar_type() && v.sizes() == k.sizes(),
              "vtattn varlen_attention: v must be a CPU tensor with k's dtype and shape");
  check_opts("vtattn varlen_attention", softcap, window, sinks, q.size(1));
  const int64_t B = cu_q.numel() - 1;
  const int64_t longest = check_cu("cu_seqlens_q", cu_q, B, q.size(0));
  check_cu("cu_seqlens_k", cu_k, B, k.size(0));
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();

  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (longest == 0) return {out, lse};  // no query rows at all
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_varlen_attention_cpu", [&] {
    varlen_kernel<scalar_t>(q, k, v, cq.const_data_ptr<int32_t>(), ck.const_data_ptr<int32_t>(), B, longest,
                            make_opts(causal, scale, softcap, window, sinks), out, lse);
  });
  return {out, lse};
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("varlen_attention", &vtattn::cpu::varlen_attention_cpu); }
