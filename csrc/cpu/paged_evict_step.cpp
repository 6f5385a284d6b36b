// CPU paged_evict_step: DecodeH2O's decode step on a static cache (kv.decode.StaticEviction) in one
// call, where the torch version issues ~70 small ops a layer and step (the spec:
// vtattn/reference/paged_evict_step.py). One task per (batch, kv head) scores its tokens and, on an
// eviction step, refills the slots it frees from its own tail; no other task touches its slots.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"
#include "paged.h"

namespace vtattn::cpu {
namespace {

// Eviction order of a head's tokens: candidates (outside the recent window) first, then by score (NaN
// last), ties to the lower position: the reference's stable sort of candidates in position order.
struct Evicts {
  const float* sc;
  const int64_t* pos;
  const char* cand;
  bool operator()(int64_t a, int64_t b) const {
    if (cand[a] != cand[b]) return cand[a] > cand[b];
    const float x = sc[a], y = sc[b];
    if ((x != x) != (y != y)) return y != y;
    if (x == x && x != y) return x < y;
    return pos[a] < pos[b];
  }
};

// The [B, H] count tensors, read on the host (CPU, any strides), checked against the pools before any write.
struct Counts {
  int64_t B, H;
  const int64_t *start, *cap, *floor;
  int32_t* len;
  int64_t* next;
  int64_t ss0, ss1, cs0, cs1, fs0, fs1, ls0, ls1, ns0, ns1;
  int64_t at(int64_t r, int64_t s0, int64_t s1) const { return r / H * s0 + r % H * s1; }
};

Counts read_counts(const at::Tensor& head_start, const at::Tensor& capacity, const at::Tensor& floor,
                   const at::Tensor& lengths, const at::Tensor& next_slot, int64_t slots, int64_t width,
                   int64_t every, int64_t recent) {
  TORCH_CHECK(lengths.dim() == 2 && lengths.size(1) > 0, "paged_evict_step: lengths must be [B, H], got ",
              lengths.sizes());
  const int64_t B = lengths.size(0), H = lengths.size(1);
  for (const auto& [name, t, dtype] : {std::tuple<const char*, const at::Tensor&, at::ScalarType>{
                                           "head_start", head_start, at::kLong},
                                       {"capacity", capacity, at::kLong},
                                       {"floor", floor, at::kLong},
                                       {"lengths", lengths, at::kInt},
                                       {"next_slot", next_slot, at::kLong}})
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == B && t.size(1) == H,
                "paged_evict_step: ", name, " must be a CPU ", dtype, " [", B, ", ", H, "] tensor, got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
  Counts c{B, H, head_start.const_data_ptr<int64_t>(), capacity.const_data_ptr<int64_t>(),
           floor.const_data_ptr<int64_t>(), lengths.data_ptr<int32_t>(), next_slot.data_ptr<int64_t>(),
           head_start.stride(0), head_start.stride(1), capacity.stride(0), capacity.stride(1), floor.stride(0),
           floor.stride(1), lengths.stride(0), lengths.stride(1), next_slot.stride(0), next_slot.stride(1)};
  for (int64_t r = 0; r < B * H; ++r) {
    const int64_t first = c.start[c.at(r, c.ss0, c.ss1)], cap = c.cap[c.at(r, c.cs0, c.cs1)];
    const int64_t n = c.len[c.at(r, c.ls0, c.ls1)], fl = c.floor[c.at(r, c.fs0, c.fs1)];
    // memory safety, and what the selection relies on (at most `every` drops, outside the recent window)
    TORCH_CHECK(first >= 0 && cap >= 1 && cap <= width && first + cap <= slots, "paged_evict_step: head (", r / H,
                ", ", r % H, ") spans slots ", first, "..", first + cap - 1, ": outside the pools' ", slots,
                " or wider than width ", width);
    TORCH_CHECK(n >= 0 && n <= cap && n <= fl + every && fl >= recent, "paged_evict_step: head (", r / H, ", ",
                r % H, ") holds ", n, " tokens in a capacity of ", cap, " with floor ", fl, ": lengths must be at most "
                "its capacity and floor + every = ", fl + every, ", and floor at least recent = ", recent);
  }
  return c;
}

template <typename T>
void step_kernel(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos, const at::Tensor& score,
                 const at::Tensor& q, const Counts& c, bool due, int64_t recent, float scale, LoadQueries load_q) {
  const int64_t H = c.H, G = q.size(1) / H, D = q.size(3);
  const Pools<T> pl(k_pages, v_pages, pos, score);
  const TileOps& ops = tile_ops();
  int64_t longest = 0;
  for (int64_t r = 0; r < c.B * H; ++r) longest = std::max<int64_t>(longest, c.len[c.at(r, c.ls0, c.ls1)]);
  at::parallel_for(0, c.B * H, grain_for(G * longest * D), [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(G * D), x(4 * D), s, sc;
    std::vector<int64_t> tpos, order;
    std::vector<char> cand, gone;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = c.len[c.at(r, c.ls0, c.ls1)], s0 = c.start[c.at(r, c.ss0, c.ss1)];
      if (n == 0) continue;
      load_q(q, r / H, r % H, G, scale, qf.data());
      const HeadRows<T> ks{pl.k, pl.kat, s0};
      const int64_t ns = round_up(n, kBN);  // the tile ops read whole kBN tiles
      s.resize(G * ns);
      logits(qf.data(), G, ks, [](int64_t j) { return j; }, n, D, x.data(), s.data(), ns);
      sc.assign(n, 0.f);
      for (int64_t g = 0; g < G; ++g) {  // each query head's softmax over the head's n tokens, summed
        float* row = &s[g * ns];
        float mx = kNegInf, sum = 0.f;
        for (int64_t j0 = 0; j0 < n; j0 += kBN) mx = std::max(mx, ops.max_of(row + j0, 0, std::min(kBN, n - j0)));
        for (int64_t j0 = 0; j0 < n; j0 += kBN) sum += ops.exp_shift_sum(row + j0, 0, std::min(kBN, n - j0), mx);
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sc[t] += row[t] * inv;
      }
      for (int64_t t = 0; t < n; ++t) {  // sc holds the grown scores from here on
        float& v = pl.score[pl.sat(s0 + t)];
        v += sc[t] / static_cast<float>(G);
        sc[t] = v;
      }
      const int64_t drop = due ? std::max<int64_t>(n - c.floor[c.at(r, c.fs0, c.fs1)], 0) : 0;
      if (drop == 0) continue;
      const int64_t keep = n - drop;
      tpos.resize(n);
      for (int64_t t = 0; t < n; ++t) tpos[t] = pl.pos[pl.pat(s0 + t)];
      cand.assign(n, 1);
      if (recent > 0) {  // the recent-th newest position and those above it stay
        order.assign(tpos.begin(), tpos.end());
        std::nth_element(order.begin(), order.begin() + (n - recent), order.end());
        const int64_t cutoff = order[n - recent];
        for (int64_t t = 0; t < n; ++t) cand[t] = tpos[t] < cutoff;
      }
      order.resize(n);
      for (int64_t t = 0; t < n; ++t) order[t] = t;
      const Evicts lower{sc.data(), tpos.data(), cand.data()};
      if (drop < n) std::nth_element(order.begin(), order.begin() + drop, order.end(), lower);
      gone.assign(n, 0);
      for (int64_t i = 0; i < drop; ++i) gone[order[i]] = 1;
      // the j-th freed slot below keep takes the j-th kept token at or past it
      for (int64_t hole = 0, from = keep;; ++hole, ++from) {
        while (hole < keep && !gone[hole]) ++hole;
        while (from < n && gone[from]) ++from;
        if (hole >= keep || from >= n) break;
        std::memcpy(pl.k + pl.kat(s0 + hole), pl.k + pl.kat(s0 + from), D * sizeof(T));
        std::memcpy(pl.v + pl.vat(s0 + hole), pl.v + pl.vat(s0 + from), D * sizeof(T));
        pl.pos[pl.pat(s0 + hole)] = tpos[from];
        pl.score[pl.sat(s0 + hole)] = sc[from];
      }
      for (int64_t t = keep; t < n; ++t) pl.pos[pl.pat(s0 + t)] = -1;
      c.len[c.at(r, c.ls0, c.ls1)] = static_cast<int32_t>(keep);
      c.next[c.at(r, c.ns0, c.ns1)] = s0 + keep;
    }
  });
}

void paged_evict_step_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
                          const at::Tensor& score, const at::Tensor& q, const at::Tensor& head_start,
                          const at::Tensor& capacity, const at::Tensor& floor, const at::Tensor& lengths,
                          const at::Tensor& next_slot, const at::Tensor& since, int64_t every, int64_t recent,
                          int64_t width, double scale) {
  check_pools("paged_evict_step", k_pages, v_pages, pos, score);
  TORCH_CHECK(since.device().is_cpu() && since.scalar_type() == at::kLong && since.numel() == 1,
              "paged_evict_step: since must be a CPU int64 tensor of one element, got ", since.scalar_type(), " ",
              since.sizes());
  TORCH_CHECK(every >= 1 && recent >= 0, "paged_evict_step: every must be >= 1 and recent >= 0, got ", every, " and ",
              recent);
  const Counts c = read_counts(head_start, capacity, floor, lengths, next_slot, k_pages.size(0) * k_pages.size(1),
                               width, every, recent);
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 4 && q.size(0) == c.B && q.size(1) % c.H == 0 && q.size(2) == 1 &&
                  q.size(3) == k_pages.size(2),
              "paged_evict_step: q must be a CPU [B, G * H, 1, D] tensor for lengths [B, H] and the pools' D, got ",
              q.sizes());
  int64_t& steps = *since.data_ptr<int64_t>();
  const bool due = steps + 1 >= every;
  steps = due ? 0 : steps + 1;
  LoadQueries load_q = nullptr;
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_evict_step_q", [&] { load_q = &load_queries<scalar_t>; });
  VTATTN_DISPATCH_FLOAT_TYPES(k_pages.scalar_type(), "paged_evict_step_cpu", [&] {
    step_kernel<scalar_t>(k_pages, v_pages, pos, score, q, c, due, recent, static_cast<float>(scale), load_q);
  });
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("paged_evict_step", &vtattn::cpu::paged_evict_step_cpu); }
