// CPU flash-style attention forward: per (batch, head, block of kBM query
// rows), key tiles of kBN are folded in with an online softmax, so nothing of
// size [Nq, Nk] exists. Inputs are read through their strides and converted to
// fp32 tile by tile; all arithmetic is fp32 (docs/internals.md).
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

template <typename T>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opts& o, at::Tensor& out,
                      at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t group = Hq / k.size(1), Nk = k.size(2);
  const int64_t dp = round_up(D, kLanes), nblk = ceil_div(Nq, kBM);
  const TileOps& ops = tile_ops();
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();

  const int64_t rows = block_rows(Nq);
  at::parallel_for(0, B * Hq * nblk, grain_for(rows * Nk * dp), [&](int64_t begin, int64_t end) {
    BlockScratch w(dp, rows);  // per chunk, reused by every task of the chunk
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nblk, bh = task / nblk, b = bh / Hq, h = bh % Hq;
      const int64_t i0 = blk * kBM, m = std::min(kBM, Nq - i0), mp = round_up(m, kRowGroup);
      const Slice<T> qs(q, b, h), ks(k, b, h / group), vs(v, b, h / group);
      load_rows(qs, m, mp, [&](int64_t r) { return i0 + r; }, D, dp, o.scale, w.qb.data());
      attend_block(ops, ks, vs, 0, i0, m, mp, Nq, Nk, o, D, dp, w);
      const float sink = o.sink(h);

      for (int64_t r = 0; r < m; ++r) {
        const int64_t row = bh * Nq + i0 + r;
        T* out_row = out_p + ((b * Nq + i0 + r) * Hq + h) * D;  // token-major [B, Nq, Hq, D] memory
        // A row that saw no key: out 0, lse -inf or the sink (not 0/0).
        const float inv = w.stats[r].norm(sink);
        for (int64_t c = 0; c < D; ++c) out_row[c] = static_cast<T>(w.acc[r * dp + c] * inv);
        lse_p[row] = w.stats[r].lse(sink);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double scale, double softcap, int64_t window,
                                                 const std::optional<at::Tensor>& sinks) {
  check_qk("vtattn attention", q, k);
  check_opts("vtattn attention", softcap, window, sinks, q.size(1));
  TORCH_CHECK(v.device().is_cpu(), "vtattn attention: v must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "vtattn attention: v must have q's dtype ", q.scalar_type(),
              ", got ", v.scalar_type());
  TORCH_CHECK(v.sizes() == k.sizes(), "vtattn attention: v must have k's shape ", k.sizes(), ", got ", v.sizes());

  // Token-major like SDPA's output: transformers' next transpose(1, 2) is then free.
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_attention_cpu", [&] {
    attention_kernel<scalar_t>(q, k, v, make_opts(causal, scale, softcap, window, sinks), out, lse);
  });
  return {out, lse};
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("attention", &vtattn::cpu::attention_cpu); }
