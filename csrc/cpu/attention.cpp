// CPU flash-style attention forward: per (batch, head, block of kBM query
// rows), key tiles of kBN are folded in with an online softmax, so nothing of
// size [Nq, Nk] exists; a block of a single row (a decode step) goes key by key
// instead (attend_row). Inputs are read through their strides and converted to
// fp32 tile by tile; all arithmetic is fp32 (docs/internals.md).
#include <torch/library.h>

#include <optional>
#include <string>
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

  // Row i of (b, h) from its accumulator and statistics; a row that saw no key: out 0, lse -inf or
  // the sink (not 0/0).
  auto finish = [&](int64_t b, int64_t h, int64_t i, const float* acc, const RowStats& st) {
    T* out_row = out_p + ((b * Nq + i) * Hq + h) * D;  // token-major [B, Nq, Hq, D] memory
    const float inv = st.norm(o.sink(h));
    for (int64_t c = 0; c < D; ++c) out_row[c] = static_cast<T>(acc[c] * inv);
    lse_p[(b * Hq + h) * Nq + i] = st.lse(o.sink(h));
  };

  const Visible vis(o, Nq, Nk);
  const int64_t rows = block_rows(Nq);
  at::parallel_for(0, B * Hq * nblk, grain_for(rows * Nk * dp), [&](int64_t begin, int64_t end) {
    // Per chunk, made at first use and reused by every task of the chunk: a block of one row (a
    // decode step) takes the one-row path and needs no tiles.
    std::optional<BlockScratch> tiles;
    std::optional<RowScratch> one;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nblk, bh = task / nblk, b = bh / Hq, h = bh % Hq;
      const int64_t i0 = blk * kBM, m = std::min(kBM, Nq - i0), mp = round_up(m, kRowGroup);
      const Slice<T> qs(q, b, h), ks(k, b, h / group), vs(v, b, h / group);
      if (m == 1) {
        RowScratch& w = one ? *one : one.emplace(D);
        RowStats st;
        load_rows(qs, 1, 1, [&](int64_t) { return i0; }, D, D, o.scale, w.q);
        attend_row(ops, ks, vs, vis.begin(i0), vis.end(i0), [](int64_t j) { return j; },
                   [](int64_t) { return false; }, o.softcap, D, w, st);
        finish(b, h, i0, w.acc, st);
        continue;
      }
      BlockScratch& w = tiles ? *tiles : tiles.emplace(dp, rows);
      load_rows(qs, m, mp, [&](int64_t r) { return i0 + r; }, D, dp, o.scale, w.qb.data());
      attend_block(ops, ks, vs, 0, i0, m, mp, Nq, Nk, o, D, dp, w);
      for (int64_t r = 0; r < m; ++r) finish(b, h, i0 + r, w.acc.data() + r * dp, w.stats[r]);
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
// (no tensor to dispatch on: the composite key serves every call)
TORCH_LIBRARY_IMPL(vtattn_C, CompositeImplicitAutograd, m) {
  m.impl("cpu_tile_level", [] { return std::string(vtattn::cpu::tile_ops().name); });
}
