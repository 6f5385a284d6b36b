// CPU block-sparse attention forward: the flash-style loop of attention.cpp over only the key
// blocks a query block lists (FlexAttention's BlockMask layout). A task is up to kBM rows of one
// query block of one (batch, head); its listed blocks are sorted (and de-duplicated), blocks past
// the task's last causal horizon dropped, and their keys streamed through kBN-wide tiles that may
// span several blocks, so small blocks still fill whole tiles. Keys come in ascending position,
// so a row's visible keys are a prefix of each tile. Lists are clamped like the Triton kernel's:
// a count outside [0, K_blocks] is clamped, a block outside [0, K_blocks) skipped (the public
// function rejects both); unlisted blocks are never read.
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

struct Lists {
  const int32_t* num;  // [Bm, Hm, Qb] contiguous
  const int32_t* idx;  // [Bm, Hm, Qb, Kb] contiguous
  int64_t Bm, Hm, Qb, Kb;
  // Listed key blocks of query block m of (b, h): sorted, distinct, in range.
  void blocks(int64_t b, int64_t h, int64_t m, std::vector<int32_t>& out) const {
    const int64_t row = ((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? h : 0)) * Qb + m;
    const int64_t count = std::clamp<int64_t>(num[row], 0, Kb);
    out.clear();
    for (int64_t e = 0; e < count; ++e) {
      const int32_t j = idx[row * Kb + e];
      if (j >= 0 && j < Kb) out.push_back(j);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
  }
};

template <typename T>
void block_sparse_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Lists& lists,
                         int64_t bs, bool causal, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t group = Hq / k.size(1), Nk = k.size(2), off = Nk - Nq;
  const int64_t dp = round_up(D, kLanes), per_block = ceil_div(bs, kBM);
  const TileOps& ops = tile_ops();
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, B * Hq * lists.Qb * per_block, 1, [&](int64_t begin, int64_t end) {
    BlockScratch w(dp);
    std::vector<int32_t> listed;
    int64_t pos[kBN];  // key positions of the current tile, ascending
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task % per_block, mb = task / per_block % lists.Qb, bh = task / per_block / lists.Qb;
      const int64_t b = bh / Hq, h = bh % Hq;
      const int64_t i0 = mb * bs + part * kBM;
      const int64_t m = std::min({kBM, (mb + 1) * bs - i0, Nq - i0});
      if (m <= 0) continue;
      const int64_t mp = round_up(m, kRowGroup);
      const Slice<T> qs(q, b, h), ks(k, b, h / group), vs(v, b, h / group);
      load_rows(qs, m, mp, [&](int64_t r) { return i0 + r; }, D, dp, scale, w.qb.data());
      std::fill(w.acc.begin(), w.acc.end(), 0.f);
      std::fill(w.stats, w.stats + kBM, RowStats{});

      // Keys [0, key_end) may be visible to some row of the task.
      const int64_t key_end = causal ? std::clamp<int64_t>(i0 + m + off, 0, Nk) : Nk;
      lists.blocks(b, h, mb, listed);
      size_t blk = 0;
      int64_t next = listed.empty() ? key_end : listed[0] * bs;  // next key to stream
      while (blk < listed.size() && next < key_end) {
        int64_t n = 0;  // fill a tile from consecutive listed blocks
        while (n < kBN && blk < listed.size()) {
          const int64_t stop = std::min({(listed[blk] + 1) * bs, Nk, key_end});
          while (n < kBN && next < stop) pos[n++] = next++;
          if (next >= stop) {
            if (++blk < listed.size()) next = listed[blk] * bs;
            if (next >= key_end) break;
          }
        }
        if (n == 0) break;
        std::fill(w.kt.begin(), w.kt.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const T* x = ks.row(pos[j]);
          for (int64_t c = 0; c < D; ++c) w.kt[c * kBN + j] = static_cast<float>(x[c * ks.sd]);
        }
        load_rows(vs, n, kBN, [&](int64_t r) { return pos[r]; }, D, dp, 1.f, w.vb.data());
        ops.qk(w.qb.data(), mp, dp, w.kt.data(), w.s.data());
        for (int64_t r = 0; r < m; ++r) {
          // the row sees the tile's keys up to its horizon: a prefix, positions being ascending
          const int64_t hi = causal ? std::upper_bound(pos, pos + n, i0 + r + off) - pos : n;
          const float alpha = w.stats[r].add(ops, w.s.data() + r * kBN, 0, hi);
          if (alpha != 1.f)
            for (int64_t c = 0; c < dp; ++c) w.acc[r * dp + c] *= alpha;
        }
        ops.pv(w.s.data(), mp, w.vb.data(), dp, w.acc.data());
      }

      for (int64_t r = 0; r < m; ++r) {
        T* o = out_p + ((b * Nq + i0 + r) * Hq + h) * D;  // token-major [B, Nq, Hq, D] memory
        const float inv = w.stats[r].norm();  // no visible key: 0
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(w.acc[r * dp + c] * inv);
        lse_p[bh * Nq + i0 + r] = w.stats[r].lse();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& kv_num_blocks,
                                                              const at::Tensor& kv_indices, int64_t block_size,
                                                              bool causal, double scale) {
  const char* op = "vtattn block_sparse_attention";
  check_qk(op, q, k);
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == q.scalar_type() && v.sizes() == k.sizes(), op,
              ": v must be a CPU tensor with k's dtype and shape ", k.sizes(), ", got ", v.scalar_type(), " ",
              v.sizes());
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive, got ", block_size);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = k.size(2);
  const int64_t Qb = ceil_div(Nq, block_size), Kb = ceil_div(Nk, block_size);
  TORCH_CHECK(kv_num_blocks.device().is_cpu() && kv_num_blocks.scalar_type() == at::kInt && kv_num_blocks.dim() == 3,
              op, ": kv_num_blocks must be a CPU int32 [B or 1, Hq or 1, Q_blocks] tensor, got ",
              kv_num_blocks.scalar_type(), " ", kv_num_blocks.sizes());
  const int64_t Bm = kv_num_blocks.size(0), Hm = kv_num_blocks.size(1);
  TORCH_CHECK((Bm == 1 || Bm == B) && (Hm == 1 || Hm == Hq) && kv_num_blocks.size(2) == Qb, op,
              ": kv_num_blocks must be [", B, " or 1, ", Hq, " or 1, ", Qb, "], got ", kv_num_blocks.sizes());
  TORCH_CHECK(kv_indices.device().is_cpu() && kv_indices.scalar_type() == at::kInt &&
                  kv_indices.sizes() == at::IntArrayRef({Bm, Hm, Qb, Kb}),
              op, ": kv_indices must be a CPU int32 [", Bm, ", ", Hm, ", ", Qb, ", ", Kb, "] tensor, got ",
              kv_indices.scalar_type(), " ", kv_indices.sizes());

  auto out = at::empty({B, Nq, Hq, q.size(3)}, q.options()).transpose(1, 2);  // token-major
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Nk == 0) return {out.zero_(), lse.fill_(kNegInf)};
  const at::Tensor num = kv_num_blocks.contiguous(), idx = kv_indices.contiguous();
  const Lists lists{num.const_data_ptr<int32_t>(), idx.const_data_ptr<int32_t>(), Bm, Hm, Qb, Kb};
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_block_sparse_attention_cpu", [&] {
    block_sparse_kernel<scalar_t>(q, k, v, lists, block_size, causal, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("block_sparse_attention", &vtattn::cpu::block_sparse_attention_cpu); }
