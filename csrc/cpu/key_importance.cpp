// CPU key_importance: scores[b, h, j] = sum over the chosen query rows i of
// the attention probabilities P[i, j] (softcap, window and sinks as attention's),
// exact (normalised by each row's log-sum-exp),
// without an [Nq, Nk] buffer. Every output element is summed by exactly one
// task, in a fixed row order, so results do not depend on the thread count.
//
// Paths (docs/internals.md):
//  - lse given: one pass; each (b, h, key tile) task recomputes its logits for
//    all rows and sums exp(s - lse).
//  - lse absent, many rows, a block's logits small enough (kBM x Nk fp32, kOnePassBytes): one
//    pass; each (b, h, block of kBM rows) task keeps its block's logits, normalises each row
//    exactly (its whole row is at hand) and sums the probabilities into its own partial row,
//    which are added in block order afterwards (double).
//  - lse absent, many rows, longer keys: a flash-style pass computes the rows' lse first.
//  - lse absent, few rows (<= kFewRows): K is read once; the rows' logits are
//    kept ([B, Hq, R, Nk] with R <= kFewRows) with per-tile max / sum-exp, the
//    tiles' statistics are merged into each row's lse, and a last pass
//    normalises the kept logits.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

constexpr int64_t kFewRows = 16;
// The one-pass path's limits: a task's logits (kBM rows of the keys) and the partial rows of all tasks.
constexpr int64_t kOnePassBytes = int64_t{8} << 20;
constexpr int64_t kPartialBytes = int64_t{256} << 20;

// The query rows of every batch element, -1 padding dropped, order and
// duplicates kept: rows [offset[b], offset[b + 1]) of idx.
struct RowLists {
  std::vector<int64_t> idx, offset;
  int64_t max_count = 0;
  const int64_t* of(int64_t b) const { return idx.data() + offset[b]; }
  int64_t count(int64_t b) const { return offset[b + 1] - offset[b]; }
};

RowLists make_row_lists(const std::optional<at::Tensor>& rows, int64_t B, int64_t Nq) {
  RowLists lists;
  lists.offset.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    if (rows) {
      const auto acc = rows->accessor<int64_t, 2>();
      for (int64_t r = 0; r < acc.size(1); ++r) {
        const int64_t i = acc[b][r];
        TORCH_CHECK(i >= -1 && i < Nq, "vtattn key_importance: rows[", b, ", ", r, "] = ", i,
                    " is out of range: row indices must lie in [0, ", Nq, ") or be -1 (skipped)");
        if (i >= 0) lists.idx.push_back(i);
      }
    } else {
      for (int64_t i = 0; i < Nq; ++i) lists.idx.push_back(i);
    }
    lists.offset.push_back(static_cast<int64_t>(lists.idx.size()));
    lists.max_count = std::max(lists.max_count, lists.count(b));
  }
  return lists;
}

// Geometry shared by the passes.
struct Shape {
  int64_t B, Hq, Nq, D, group, Nk, dp, ntiles;
  Shape(const at::Tensor& q, const at::Tensor& k)
      : B(q.size(0)), Hq(q.size(1)), Nq(q.size(2)), D(q.size(3)), group(q.size(1) / k.size(1)), Nk(k.size(2)),
        dp(round_up(q.size(3), kLanes)), ntiles(ceil_div(k.size(2), kBN)) {}
};

// Folds the statistics of another set of keys into `a` (same row).
void merge(RowStats& a, const RowStats& o) {
  if (o.empty()) return;
  if (a.empty()) {
    a = o;
    return;
  }
  const float m = o.max != o.max ? o.max : std::max(a.max, o.max);  // NaN stays NaN
  a.sum = a.sum * std::exp(a.max - m) + o.sum * std::exp(o.max - m);
  a.max = m;
}

// Task `task` of the (b, h, block of kBM listed rows) tasks: its rows, their scaled q rows loaded in qb,
// and the keys any of them (unordered) sees. False for a batch element with fewer rows than the longest list.
struct RowBlock {
  int64_t b, h, r0, m, mp, kbegin, kend;
  const int64_t* idx;
};
template <typename T>
bool row_block(const at::Tensor& q, const Shape& sh, const RowLists& rows, const Visible& vis, float scale,
               int64_t task, int64_t nblk, float* qb, RowBlock& w) {
  const int64_t bh = task / nblk;
  w.b = bh / sh.Hq;
  w.h = bh % sh.Hq;
  w.r0 = task % nblk * kBM;
  w.m = std::min(kBM, rows.count(w.b) - w.r0);
  if (w.m <= 0) return false;
  w.mp = round_up(w.m, kRowGroup);
  w.idx = rows.of(w.b) + w.r0;
  load_rows(Slice<T>(q, w.b, w.h), w.m, w.mp, [&](int64_t r) { return w.idx[r]; }, sh.D, sh.dp, scale, qb);
  w.kbegin = sh.Nk;
  w.kend = 0;
  for (int64_t r = 0; r < w.m; ++r) {
    w.kbegin = std::min(w.kbegin, vis.begin(w.idx[r]));
    w.kend = std::max(w.kend, vis.end(w.idx[r]));
  }
  return true;
}

// lse_sel[(b * Hq + h) * R + r] = log-sum-exp of row rows[b][r], flash style:
// tasks are (b, h, block of kBM listed rows).
template <typename T>
void row_lse(const at::Tensor& q, const at::Tensor& k, const Shape& sh, const RowLists& rows, const Opts& o,
             float* lse_sel) {
  const Visible vis(o, sh.Nq, sh.Nk);
  const TileOps& ops = tile_ops();
  const int64_t R = rows.max_count, nblk = ceil_div(R, kBM);
  at::parallel_for(0, sh.B * sh.Hq * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qb(kBM * sh.dp), kt(sh.dp * kBN), s(kBM * kBN);
    RowStats stats[kBM];
    RowBlock w;
    for (int64_t task = begin; task < end; ++task) {
      if (!row_block<T>(q, sh, rows, vis, o.scale, task, nblk, qb.data(), w)) continue;
      const auto [b, h, r0, m, mp, kbegin, kend, idx] = w;
      const Slice<T> ks(k, b, h / sh.group);
      std::fill(stats, stats + kBM, RowStats{});
      for (int64_t j0 = kbegin / kBN * kBN; j0 < kend; j0 += kBN) {
        const int64_t n = std::min(kBN, sh.Nk - j0);
        load_keys_t(ks, j0, n, sh.D, sh.dp, kt.data());
        ops.qk(qb.data(), mp, sh.dp, kt.data(), s.data());
        if (o.softcap > 0.f) ops.softcap(s.data(), mp * kBN, o.softcap);
        for (int64_t r = 0; r < m; ++r)
          stats[r].add(ops, s.data() + r * kBN, std::clamp<int64_t>(vis.begin(idx[r]) - j0, 0, n),
                       std::clamp<int64_t>(vis.end(idx[r]) - j0, 0, n));
      }
      for (int64_t r = 0; r < m; ++r) lse_sel[(b * sh.Hq + h) * R + r0 + r] = stats[r].lse(o.sink(h));
    }
  });
}

// scores[b, h, tile] = sum over the listed rows of exp(s - lse_sel), the logits
// recomputed per tile: tasks are (b, h, key tile), each looping over all rows.
template <typename T>
void column_sums(const at::Tensor& q, const at::Tensor& k, const Shape& sh, const RowLists& rows, const Opts& o,
                 const float* lse_sel, float* out) {
  const TileOps& ops = tile_ops();
  const Visible vis(o, sh.Nq, sh.Nk);
  const int64_t R = rows.max_count;
  at::parallel_for(0, sh.B * sh.Hq * sh.ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qb(kBM * sh.dp), kt(sh.dp * kBN), s(kBM * kBN);
    int64_t lo[kBM], hi[kBM];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % sh.ntiles, bh = task / sh.ntiles, b = bh / sh.Hq, h = bh % sh.Hq;
      const int64_t j0 = t * kBN, n = std::min(kBN, sh.Nk - j0);
      const Slice<T> qs(q, b, h), ks(k, b, h / sh.group);
      const float* lse_b = lse_sel + bh * R;
      load_keys_t(ks, j0, n, sh.D, sh.dp, kt.data());

      double total[kBN] = {};  // across row blocks in double: sums over thousands of rows
      for (int64_t r0 = 0; r0 < rows.count(b); r0 += kBM) {
        const int64_t m = std::min(kBM, rows.count(b) - r0), mp = round_up(m, kRowGroup);
        const int64_t* idx = rows.of(b) + r0;
        bool any = false;
        for (int64_t r = 0; r < m; ++r) {
          // A row that sees no key (lse -inf) contributes nothing.
          lo[r] = std::clamp<int64_t>(vis.begin(idx[r]) - j0, 0, n);
          hi[r] = lse_b[r0 + r] == kNegInf ? 0 : std::clamp<int64_t>(vis.end(idx[r]) - j0, 0, n);
          any = any || lo[r] < hi[r];
        }
        if (!any) continue;
        load_rows(qs, m, mp, [&](int64_t r) { return idx[r]; }, sh.D, sh.dp, o.scale, qb.data());
        ops.qk(qb.data(), mp, sh.dp, kt.data(), s.data());
        if (o.softcap > 0.f) ops.softcap(s.data(), mp * kBN, o.softcap);
        float part[kBN] = {};
        ops.add_exp_rows(s.data(), kBN, m, lo, hi, lse_b + r0, part);
        for (int64_t j = 0; j < n; ++j) total[j] += part[j];
      }
      float* o = out + bh * sh.Nk + j0;
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(total[j]);
    }
  });
}

// Many rows, no lse, keys that fit: each listed row's probabilities from one computation of its logits
// (the two-pass path computes them twice). Semantics as row_lse + column_sums: NaN among a row's
// visible logits makes its visible keys NaN, a row that sees no finite logit adds nothing.
template <typename T>
void one_pass(const at::Tensor& q, const at::Tensor& k, const Shape& sh, const RowLists& rows, const Opts& o,
              float* out) {
  const TileOps& ops = tile_ops();
  const Visible vis(o, sh.Nq, sh.Nk);
  const int64_t nblk = ceil_div(rows.max_count, kBM), Nkp = sh.ntiles * kBN, BH = sh.B * sh.Hq;
  std::vector<float> part(BH * nblk * Nkp, 0.f);  // task (bh, blk)'s column sums
  at::parallel_for(0, BH * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qb(kBM * sh.dp), tile(kBM * kBN), s(kBM * Nkp);
    HeldTiles keys;  // a kv head's transposed key tiles, for its next row block
    RowBlock w;
    for (int64_t task = begin; task < end; ++task) {
      if (!row_block<T>(q, sh, rows, vis, o.scale, task, nblk, qb.data(), w)) continue;
      const auto [b, h, r0, m, mp, kbegin, kend, idx] = w;
      const Slice<T> ks(k, b, h / sh.group);
      for (int64_t j0 = kbegin / kBN * kBN; j0 < kend; j0 += kBN) {
        ops.qk(qb.data(), mp, sh.dp, keys.get<T>(ks, nullptr, 0, sh.Nk, j0, sh.D, sh.dp).first, tile.data());
        if (o.softcap > 0.f) ops.softcap(tile.data(), mp * kBN, o.softcap);
        for (int64_t r = 0; r < m; ++r) std::copy_n(tile.data() + r * kBN, kBN, s.data() + r * Nkp + j0);
      }
      float* acc = part.data() + task * Nkp;
      const float sink = o.sink(h);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t lo = vis.begin(idx[r]), hi = vis.end(idx[r]);
        if (lo >= hi) continue;  // it sees no key
        float* row = s.data() + r * Nkp;
        // the chunks of kBN keys of this row: [c0, c0 + kBN) with the visible part [lo, hi) in chunk coordinates
        auto chunk = [&](int64_t c0) { return std::pair{std::clamp<int64_t>(lo - c0, 0, kBN),
                                                        std::clamp<int64_t>(hi - c0, 0, kBN)}; };
        float mx = kNegInf;
        for (int64_t c0 = lo / kBN * kBN; c0 < hi; c0 += kBN) {
          const auto [a, z] = chunk(c0);
          mx = std::max(mx, ops.max_of(row + c0, a, z));  // NaN skipped
        }
        if (mx == kNegInf) {  // no finite logit: nothing, unless a NaN poisons the row (as RowStats)
          if (std::any_of(row + lo, row + hi, [](float x) { return x != x; }))
            std::fill(acc + lo, acc + hi, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        const float top = sink != sink ? sink : std::max(mx, sink);
        float sum = std::exp(sink - top);  // 0 without a sink
        for (int64_t c0 = lo / kBN * kBN; c0 < hi; c0 += kBN) {
          const auto [a, z] = chunk(c0);
          sum += ops.exp_shift_sum(row + c0, a, z, top);  // the chunk's visible keys now hold exp(s - top)
        }
        axpy(1.f / sum, row + lo, acc + lo, hi - lo);
      }
    }
  });
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(sh.Nk);
    for (int64_t bh = begin; bh < end; ++bh) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const float* p = part.data() + (bh * nblk + blk) * Nkp;
        for (int64_t j = 0; j < sh.Nk; ++j) total[j] += p[j];
      }
      for (int64_t j = 0; j < sh.Nk; ++j) out[bh * sh.Nk + j] = static_cast<float>(total[j]);
    }
  });
}

// Few rows, no lse: K is read once. Logits go to `logits` [B*Hq, Rp, Nkp] with
// per-tile statistics, which are merged into each row's lse before a pass over
// the kept logits sums the probabilities.
template <typename T>
void few_rows(const at::Tensor& q, const at::Tensor& k, const Shape& sh, const RowLists& rows, const Opts& o,
              float* out) {
  const TileOps& ops = tile_ops();
  const int64_t R = rows.max_count, Rp = round_up(R, kRowGroup), Nkp = sh.ntiles * kBN;
  const int64_t BH = sh.B * sh.Hq;
  std::vector<float> logits(BH * Rp * Nkp);
  std::vector<RowStats> tile_stats(BH * R * sh.ntiles);
  std::vector<float> lse(BH * R);
  const Visible vis(o, sh.Nq, sh.Nk);
  // Row r of batch b sees tile keys [lo, hi) of the tile at j0.
  auto range_of = [&](int64_t b, int64_t r, int64_t j0) {
    const int64_t n = std::min(kBN, sh.Nk - j0), i = rows.of(b)[r];
    return std::pair<int64_t, int64_t>{std::clamp<int64_t>(vis.begin(i) - j0, 0, n),
                                       std::clamp<int64_t>(vis.end(i) - j0, 0, n)};
  };

  at::parallel_for(0, BH * sh.ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qb(Rp * sh.dp), kt(sh.dp * kBN);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % sh.ntiles, bh = task / sh.ntiles, b = bh / sh.Hq, h = bh % sh.Hq;
      const int64_t j0 = t * kBN, m = rows.count(b);
      if (m == 0) continue;
      const int64_t* idx = rows.of(b);
      const Slice<T> qs(q, b, h), ks(k, b, h / sh.group);
      load_rows(qs, m, round_up(m, kRowGroup), [&](int64_t r) { return idx[r]; }, sh.D, sh.dp, o.scale, qb.data());
      load_keys_t(ks, j0, std::min(kBN, sh.Nk - j0), sh.D, sh.dp, kt.data());
      float s[kFewRows * kBN];
      ops.qk(qb.data(), round_up(m, kRowGroup), sh.dp, kt.data(), s);
      if (o.softcap > 0.f) ops.softcap(s, round_up(m, kRowGroup) * kBN, o.softcap);
      for (int64_t r = 0; r < m; ++r) {
        float* row = s + r * kBN;
        std::copy(row, row + kBN, logits.data() + (bh * Rp + r) * Nkp + j0);
        const auto [lo, hi] = range_of(b, r, j0);
        tile_stats[(bh * R + r) * sh.ntiles + t].add(ops, row, lo, hi);  // overwrites row: copied first
      }
    }
  });

  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      for (int64_t r = 0; r < R; ++r) {
        RowStats total;
        for (int64_t t = 0; t < sh.ntiles; ++t) merge(total, tile_stats[(bh * R + r) * sh.ntiles + t]);
        lse[bh * R + r] = total.lse(o.sink(bh % sh.Hq));
      }
  });

  at::parallel_for(0, BH * sh.ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % sh.ntiles, bh = task / sh.ntiles, b = bh / sh.Hq;
      const int64_t j0 = t * kBN, n = std::min(kBN, sh.Nk - j0);
      float total[kBN] = {};  // at most kFewRows terms: fp32 is plenty
      int64_t lo[kFewRows], hi[kFewRows];
      for (int64_t r = 0; r < rows.count(b); ++r) {
        std::tie(lo[r], hi[r]) = range_of(b, r, j0);
        if (lse[bh * R + r] == kNegInf) hi[r] = 0;  // a row that sees no key adds nothing
      }
      ops.add_exp_rows(logits.data() + bh * Rp * Nkp + j0, Nkp, rows.count(b), lo, hi, lse.data() + bh * R, total);
      std::copy(total, total + n, out + bh * sh.Nk + j0);
    }
  });
}

at::Tensor key_importance_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,
                              const std::optional<at::Tensor>& rows, bool causal, double scale, double softcap,
                              int64_t window, const std::optional<at::Tensor>& sinks) {
  const char* op = "vtattn key_importance";
  check_qk(op, q, k);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2);
  check_opts(op, softcap, window, sinks, Hq);
  if (rows) {
    TORCH_CHECK(rows->device().is_cpu(), op, ": rows must be a CPU tensor, got ", rows->device());
    TORCH_CHECK(rows->scalar_type() == at::kLong, op, ": rows must be int64, got ", rows->scalar_type());
    TORCH_CHECK(rows->dim() == 2 && rows->size(0) == B, op, ": rows must be [B, R] with B = ", B, ", got shape ",
                rows->sizes());
  }
  if (lse) {
    TORCH_CHECK(lse->device().is_cpu(), op, ": lse must be a CPU tensor, got ", lse->device());
    TORCH_CHECK(lse->scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse->scalar_type());
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == Hq && lse->size(2) == Nq, op,
                ": lse must be [B, Hq, Nq] = [", B, ", ", Hq, ", ", Nq, "], got shape ", lse->sizes());
  }
  const RowLists lists = make_row_lists(rows, B, Nq);  // also bounds-checks the indices
  const Shape sh(q, k);
  auto out = at::empty({B, Hq, sh.Nk}, q.options().dtype(at::kFloat));
  const Opts o = make_opts(causal, scale, softcap, window, sinks);

  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_key_importance_cpu", [&] {
    if (!lse && lists.max_count <= kFewRows) {
      few_rows<scalar_t>(q, k, sh, lists, o, out.data_ptr<float>());
      return;
    }
    const int64_t R = lists.max_count, Nkp = sh.ntiles * kBN;
    if (!lse && kBM * Nkp * 4 <= kOnePassBytes && B * Hq * ceil_div(R, kBM) * Nkp * 4 <= kPartialBytes) {
      one_pass<scalar_t>(q, k, sh, lists, o, out.data_ptr<float>());
      return;
    }
    std::vector<float> lse_sel(B * Hq * R);
    if (lse) {
      const auto acc = lse->accessor<float, 3>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h)
          for (int64_t r = 0; r < lists.count(b); ++r) lse_sel[(b * Hq + h) * R + r] = acc[b][h][lists.of(b)[r]];
    } else {
      row_lse<scalar_t>(q, k, sh, lists, o, lse_sel.data());
    }
    column_sums<scalar_t>(q, k, sh, lists, o, lse_sel.data(), out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("key_importance", &vtattn::cpu::key_importance_cpu); }
