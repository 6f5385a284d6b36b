// CPU paged_evict: decode-time H2O eviction of a paged cache (kv.pages.Pages) in one call, where the
// torch version issues ~60 small ops (the spec: vtattn/reference/paged_evict.py). One task per
// (batch, kv head) scores, selects and compacts its own run of slots, which no other task touches.
#include <torch/library.h>

#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "paged.h"

namespace vtattn::cpu {
namespace {

// Moves `count` consecutive slots of `width` elements each from slot src down to slot dst < src of
// one pool: one memmove where the slots are contiguous, else slot by slot in ascending order (a
// destination never passes its source, so nothing is overwritten before it is read).
template <typename E>
void move_slots(E* base, const SlotOf& at, int64_t dst, int64_t src, int64_t count, int64_t width) {
  if (at.linear && at.sr == width) {
    std::memmove(base + at(dst), base + at(src), count * width * sizeof(E));
    return;
  }
  for (int64_t i = 0; i < count; ++i) std::memcpy(base + at(dst + i), base + at(src + i), width * sizeof(E));
}

// Eviction order: lower score first, NaN last (as torch's sort), ties to the older token.
struct Lower {
  const float* sc;
  bool operator()(int64_t a, int64_t b) const {
    const float x = sc[a], y = sc[b];
    if ((x != x) != (y != y)) return y != y;
    if (x == x && x != y) return x < y;
    return a < b;
  }
};

// Head r = b * H + h: its run starts at slot first[r] and holds len[r] tokens, of which keep[r] stay.
struct Heads {
  int64_t H = 0, longest = 0;
  std::vector<int64_t> first, len, keep;
};

template <typename T>
void evict_kernel(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
                  const at::Tensor& score, const at::Tensor& queries, const Heads& hd, int64_t start, int64_t recent,
                  float scale, LoadQueries load_q) {
  const int64_t H = hd.H, G = queries.size(1) / H, n = queries.size(2), D = queries.size(3), rows = G * n;
  const Pools<T> pl(k_pages, v_pages, pos, score);
  const TileOps& ops = tile_ops();
  const int64_t heads = static_cast<int64_t>(hd.len.size());
  at::parallel_for(0, heads, grain_for(rows * hd.longest * D), [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(rows * D), x(4 * D), s, mass;
    std::vector<int64_t> tpos, order;
    std::vector<char> gone;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t L = hd.len[r], s0 = hd.first[r], kept = hd.keep[r];
      if (L == 0) continue;
      load_q(queries, r / H, r % H, G, scale, qf.data());
      // logits of every query row against every token, in rows of whole kBN tiles (the tile ops read whole tiles)
      const HeadRows<T> ks{pl.k, pl.kat, s0};
      const int64_t ns = round_up(L, kBN);
      s.resize(rows * ns);
      logits(qf.data(), rows, ks, [](int64_t j) { return j; }, L, D, x.data(), s.data(), ns);
      // each row's softmax over the tokens it sees (pos <= its position), summed into the tokens' mass
      tpos.resize(L);
      for (int64_t t = 0; t < L; ++t) tpos[t] = pl.pos[pl.pat(s0 + t)];
      mass.assign(L, 0.f);
      for (int64_t q = 0; q < rows; ++q) {
        float* sr = &s[q * ns];
        const int64_t at_pos = start + q % n;
        for (int64_t t = 0; t < L; ++t)
          if (tpos[t] > at_pos) sr[t] = kNegInf;
        float mx = kNegInf, sum = 0.f;
        for (int64_t j0 = 0; j0 < L; j0 += kBN) mx = std::max(mx, ops.max_of(sr + j0, 0, std::min(kBN, L - j0)));
        if (mx == kNegInf) continue;  // it sees no token: it adds nothing
        for (int64_t j0 = 0; j0 < L; j0 += kBN) sum += ops.exp_shift_sum(sr + j0, 0, std::min(kBN, L - j0), mx);
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) mass[t] += sr[t] * inv;
      }
      // every token's score grows; mass holds the new scores from here on
      for (int64_t t = 0; t < L; ++t) {
        float& sc = pl.score[pl.sat(s0 + t)];
        sc += mass[t] / static_cast<float>(G);
        mass[t] = sc;
      }
      // the L - kept lowest-scored of the first L - recent tokens go (read_heads checked they fit there)
      const int64_t drop = L - kept, cand = std::max<int64_t>(L - recent, 0);
      if (drop == 0) continue;
      order.resize(cand);
      std::iota(order.begin(), order.end(), int64_t{0});
      if (drop < cand) std::nth_element(order.begin(), order.begin() + drop, order.end(), Lower{mass.data()});
      gone.assign(L, 0);
      for (int64_t i = 0; i < drop; ++i) gone[order[i]] = 1;
      // kept tokens to the front in order, a run of consecutive ones at a time
      for (int64_t t = 0, w = 0; t < L;) {
        if (gone[t]) {
          ++t;
          continue;
        }
        int64_t e = t + 1;
        while (e < L && !gone[e]) ++e;
        if (w != t) {
          move_slots(pl.k, pl.kat, s0 + w, s0 + t, e - t, D);
          move_slots(pl.v, pl.vat, s0 + w, s0 + t, e - t, D);
          move_slots(pl.pos, pl.pat, s0 + w, s0 + t, e - t, 1);
          move_slots(pl.score, pl.sat, s0 + w, s0 + t, e - t, 1);
        }
        w += e - t;
        t = e;
      }
      for (int64_t t = kept; t < L; ++t) pl.pos[pl.pat(s0 + t)] = -1;
    }
  });
}

// The host's counts [B, H] (int64, CPU, any strides), checked against each other and the pools.
Heads read_heads(const at::Tensor& head_start, const at::Tensor& lengths, const at::Tensor& keep, int64_t B,
                 int64_t H, int64_t recent, int64_t slots) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"head_start", head_start},
                                {"lengths", lengths}, {"keep", keep}})
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) == B &&
                    t.size(1) == H,
                "paged_evict: ", name, " must be a CPU int64 [", B, ", ", H, "] tensor, got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
  const auto s = head_start.accessor<int64_t, 2>(), l = lengths.accessor<int64_t, 2>();
  const auto k = keep.accessor<int64_t, 2>();
  Heads hd;
  hd.H = H;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t first = s[b][h], len = l[b][h], kept = k[b][h];
      // memory safety, and what the selection relies on (one pass over the heads)
      TORCH_CHECK(first >= 0 && len >= 0 && first + len <= slots, "paged_evict: head (", b, ", ", h,
                  ") spans slots ", first, "..", first + len - 1, " outside the pools' ", slots);
      TORCH_CHECK(kept >= 0 && kept <= len && len - kept <= std::max<int64_t>(len - recent, 0), "paged_evict: head (",
                  b, ", ", h, ") keeps ", kept, " of ", len, " tokens: it may drop only among its first lengths - ",
                  recent);
      hd.first.push_back(first), hd.len.push_back(len), hd.keep.push_back(kept);
      hd.longest = std::max(hd.longest, len);
    }
  return hd;
}

// The pools' counts after the eviction, where given: counts = keep (int32), next_slot = head_start + keep
// (int64), CPU [B, H] (checked before any write).
void set_counts(const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& next_slot,
                const Heads& hd, int64_t B, bool write) {
  for (const auto& [name, t, dtype] : {std::tuple<const char*, const std::optional<at::Tensor>&, at::ScalarType>{
                                           "counts", counts, at::kInt},
                                       {"next_slot", next_slot, at::kLong}}) {
    if (!t) continue;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 2 && t->size(0) == B &&
                    t->size(1) == hd.H,
                "paged_evict: ", name, " must be a CPU ", dtype, " [", B, ", ", hd.H, "] tensor, got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  if (!write) return;
  for (int64_t r = 0; r < B * hd.H; ++r) {
    const int64_t b = r / hd.H, h = r % hd.H;
    if (counts) counts->data_ptr<int32_t>()[b * counts->stride(0) + h * counts->stride(1)] = hd.keep[r];
    if (next_slot)
      next_slot->data_ptr<int64_t>()[b * next_slot->stride(0) + h * next_slot->stride(1)] = hd.first[r] + hd.keep[r];
  }
}

void paged_evict_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
                     const at::Tensor& score, const at::Tensor& queries, const at::Tensor& head_start,
                     const at::Tensor& lengths, const at::Tensor& keep, int64_t start, int64_t recent, double scale,
                     const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& next_slot) {
  check_pools("paged_evict", k_pages, v_pages, pos, score);
  TORCH_CHECK(lengths.dim() == 2 && lengths.size(1) > 0, "paged_evict: lengths must be [B, H], got ", lengths.sizes());
  const int64_t B = lengths.size(0), H = lengths.size(1);
  TORCH_CHECK(queries.device().is_cpu() && queries.dim() == 4 && queries.size(0) == B && queries.size(1) % H == 0 &&
                  queries.size(3) == k_pages.size(2),
              "paged_evict: queries must be a CPU [B, G * H, n, D] tensor for lengths [B, H] and the pools' D, got ",
              queries.sizes());
  const Heads hd = read_heads(head_start, lengths, keep, B, H, recent, k_pages.size(0) * k_pages.size(1));
  set_counts(counts, next_slot, hd, B, false);
  LoadQueries load_q = nullptr;
  VTATTN_DISPATCH_FLOAT_TYPES(queries.scalar_type(), "paged_evict_queries", [&] { load_q = &load_queries<scalar_t>; });
  VTATTN_DISPATCH_FLOAT_TYPES(k_pages.scalar_type(), "paged_evict_cpu", [&] {
    evict_kernel<scalar_t>(k_pages, v_pages, pos, score, queries, hd, start, recent, static_cast<float>(scale), load_q);
  });
  set_counts(counts, next_slot, hd, B, true);
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("paged_evict", &vtattn::cpu::paged_evict_cpu); }
