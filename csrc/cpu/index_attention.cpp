// CPU index attention forward: the flash-style loop of attention.cpp where the
// key tiles are the listed keys of one (batch, kv head), loaded by index, and
// the causal mask compares original positions (so it is not a prefix: masked
// logits are set to -inf, which RowStats turns into probability 0). A block of a
// single row (a decode step) goes key by key instead (attend_row).
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

template <typename T>
void index_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* idx_p,
                  const int32_t* cnt_p, const int64_t* qpos, const int64_t* kpos, int64_t L, bool causal, float scale,
                  at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), group = Hq / Hkv, Nk = k.size(2);
  const int64_t dp = round_up(D, kLanes), nblk = ceil_div(Nq, kBM);
  const TileOps& ops = tile_ops();
  T* out_p = out.data_ptr<T>();  // [B, Nq, Hq, D] memory

  const int64_t rows = block_rows(Nq);
  at::parallel_for(0, B * Hq * nblk, grain_for(rows * L * dp), [&](int64_t begin, int64_t end) {
    // Per chunk, made at first use: a block of one row (a decode step) needs no tiles.
    std::optional<BlockScratch> tiles;
    std::optional<RowScratch> one;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nblk, bh = task / nblk, b = bh / Hq, h = bh % Hq, kvh = h / group;
      const int64_t i0 = blk * kBM, m = std::min(kBM, Nq - i0), mp = round_up(m, kRowGroup);
      const int64_t* idx = idx_p + (b * Hkv + kvh) * L;
      const int64_t count = cnt_p[b * Hkv + kvh];
      const int64_t* kp = kpos + b * Nk;
      const Slice<T> qs(q, b, h), ks(k, b, kvh), vs(v, b, kvh);
      // Row i's output; no visible key: 0.
      auto finish = [&](int64_t i, const float* acc, const RowStats& st) {
        T* o = out_p + ((b * Nq + i) * Hq + h) * D;
        const float inv = st.empty() ? 0.f : 1.f / st.sum;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(acc[c] * inv);
      };

      if (m == 1) {
        RowScratch& w = one ? *one : one.emplace(D);
        RowStats st;
        const int64_t qp = qpos[b * Nq + i0];
        load_rows(qs, 1, 1, [&](int64_t) { return i0; }, D, D, scale, w.q);
        attend_row(ops, ks, vs, 0, count, [&](int64_t j) { return idx[j]; },
                   [&](int64_t j) { return causal && kp[idx[j]] > qp; }, 0.f, D, w, st);
        finish(i0, w.acc, st);
        continue;
      }
      BlockScratch& w = tiles ? *tiles : tiles.emplace(dp, rows);
      Scratch &qb = w.qb, &kt = w.kt, &vb = w.vb, &s = w.s, &acc = w.acc;
      RowStats* stats = w.stats;
      load_rows(qs, m, mp, [&](int64_t r) { return i0 + r; }, D, dp, scale, qb.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(stats, stats + kBM, RowStats{});
      for (int64_t j0 = 0; j0 < count; j0 += kBN) {
        const int64_t n = std::min(kBN, count - j0);
        std::fill(kt.begin(), kt.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const T* x = ks.row(idx[j0 + j]);
          for (int64_t c = 0; c < D; ++c) kt[c * kBN + j] = static_cast<float>(x[c * ks.sd]);
        }
        load_rows(vs, n, kBN, [&](int64_t r) { return idx[j0 + r]; }, D, dp, 1.f, vb.data());
        ops.qk(qb.data(), mp, dp, kt.data(), s.data());
        for (int64_t r = 0; r < m; ++r) {
          float* row = s.data() + r * kBN;
          if (causal) {
            const int64_t qp = qpos[b * Nq + i0 + r];
            for (int64_t j = 0; j < n; ++j)
              if (kp[idx[j0 + j]] > qp) row[j] = kNegInf;
          }
          const float alpha = stats[r].add(ops, row, n);
          if (alpha != 1.f)
            for (int64_t c = 0; c < dp; ++c) acc[r * dp + c] *= alpha;
        }
        ops.pv(s.data(), mp, vb.data(), dp, acc.data());
      }
      for (int64_t r = 0; r < m; ++r) finish(i0 + r, acc.data() + r * dp, stats[r]);
    }
  });
}

at::Tensor index_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& kv_indices, const at::Tensor& kv_counts,
                               const at::Tensor& q_positions, const at::Tensor& kv_positions, bool causal,
                               double scale) {
  const char* op = "vtattn index_attention";
  check_qk(op, q, k);
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == q.scalar_type() && v.sizes() == k.sizes(), op,
              ": v must be a CPU tensor with k's dtype and shape");
  const int64_t B = q.size(0), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(kv_indices.scalar_type() == at::kLong && kv_indices.dim() == 3 && kv_indices.size(0) == B &&
                  kv_indices.size(1) == Hkv, op, ": kv_indices must be int64 [B, Hkv, L], got ",
              kv_indices.scalar_type(), " ", kv_indices.sizes());
  const int64_t L = kv_indices.size(2);
  TORCH_CHECK(kv_counts.scalar_type() == at::kInt && kv_counts.sizes() == at::IntArrayRef({B, Hkv}), op,
              ": kv_counts must be int32 [B, Hkv]");
  TORCH_CHECK(q_positions.scalar_type() == at::kLong && q_positions.sizes() == at::IntArrayRef({B, q.size(2)}) &&
                  kv_positions.scalar_type() == at::kLong && kv_positions.sizes() == at::IntArrayRef({B, Nk}),
              op, ": q_positions / kv_positions must be int64 [B, Nq] / [B, Nk]");
  const at::Tensor idx = kv_indices.contiguous(), cnt = kv_counts.contiguous(), qp = q_positions.contiguous(),
                   kp = kv_positions.contiguous();
  // The kernel loads rows by index: a bad entry would read outside K/V.
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int32_t* cp = cnt.const_data_ptr<int32_t>();
  for (int64_t s = 0; s < B * Hkv; ++s) {
    TORCH_CHECK(cp[s] >= 0 && cp[s] <= L, op, ": kv_counts must lie in [0, L]");
    for (int64_t j = 0; j < cp[s]; ++j)
      TORCH_CHECK(ip[s * L + j] >= 0 && ip[s * L + j] < Nk, op, ": kv_indices must lie in [0, Nk)");
  }

  auto out = at::empty({B, q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_index_attention_cpu", [&] {
    index_kernel<scalar_t>(q, k, v, ip, cp, qp.const_data_ptr<int64_t>(), kp.const_data_ptr<int64_t>(), L, causal,
                           static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("index_attention", &vtattn::cpu::index_attention_cpu); }
