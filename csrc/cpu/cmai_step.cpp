// CPU cmai_step: CMAI's pass 2 for a decode step's text rows against the layer's record (the spec:
// vtattn/reference/cmai_step.py). Three passes, each a parallel loop, with fp32 scratch:
// 1. a task per (batch, query head), its rows in order: the row's logits against the text and image
//    entries it sees (kept for pass 3), their probabilities, its P_ti row written, then the head's share
//    of its focus, sum over the visible text entries t of P_tt[t] * P_ti[t, :] (a visible entry is this
//    row or an earlier one: its P_ti row is written by now);
// 2. a task per (batch, row): the head mean of the focus, the row's budget and the kept image keys
//    (nth_element by focus, ties to the lower index);
// 3. a task per (batch, query head, row): the softmax with the other image keys' probabilities
//    multiplied by `weight` (0: masked), times the values.
// No index comes from a tensor's values (entries are compared by position), so no value can read
// out of bounds.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace vtattn::cpu {
namespace {

constexpr const char* kOp = "vtattn cmai_step";

struct Lists {  // one sample's entries: their positions and which hold a token
  const int64_t* pos;
  const bool* ok;
  int64_t sp, so, n;
  Lists(const at::Tensor& p, const at::Tensor& o, int64_t b)
      : pos(p.const_data_ptr<int64_t>() + b * p.stride(0)),
        ok(o.const_data_ptr<bool>() + b * o.stride(0)),
        sp(p.stride(1)), so(o.stride(1)), n(p.size(1)) {}
  // the entries a row at position `at` sees, into `out`
  int64_t seen(int64_t at, int64_t* out) const {
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j)
      if (ok[j * so] && pos[j * sp] <= at) out[m++] = j;
    return m;
  }
};

// x[0, n) = exp(x - shift) in place, their sum; x holds round_up(n, kBN) floats. The tile operations'
// vectorised exp: std::exp per logit was most of the kernel's time.
float exp_sum(const TileOps& ops, float* x, int64_t n, float shift) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; j += kBN) sum += ops.exp_shift_sum(x + j, 0, std::min(kBN, n - j), shift);
  return sum;
}

template <typename S>
void cmai_kernel(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& text,
                 const at::Tensor& text_ok, const at::Tensor& k_i, const at::Tensor& v_i, const at::Tensor& image,
                 const at::Tensor& image_ok, at::Tensor& p_ti, double keep, double weight, float scale,
                 at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), R = q.size(2), D = q.size(3);
  const int64_t rep = Hq / k_t.size(1), T = text.size(1), I = image.size(1), first = T - R, W = T + I;
  std::vector<float> logit(B * Hq * R * W), part(B * Hq * R * I);  // pass 1's logits and per-head focus
  std::vector<uint8_t> kept(B * R * I);
  float* P = p_ti.data_ptr<float>();
  const int64_t ps0 = p_ti.stride(0), ps1 = p_ti.stride(1), ps2 = p_ti.stride(2), ps3 = p_ti.stride(3);
  auto p_row = [&](int64_t b, int64_t h, int64_t t) { return P + b * ps0 + h * ps1 + t * ps2; };
  // 1. logits, their exps over the row's sum (P_tt, P_ti), P_ti rows, each head's focus
  const TileOps& ops = tile_ops();
  at::parallel_for(0, B * Hq, grain_for(R * W * (D + I)), [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(D), x(4 * D), et(round_up(T, kBN)), ei(round_up(I, kBN));
    std::vector<int64_t> st(T), si(I);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / Hq, h = task % Hq;
      const Lists tl(text, text_ok, b), il(image, image_ok, b);
      const Slice<S> qs(q, b, h), kts(k_t, b, h / rep), kis(k_i, b, h / rep);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t e = first + r;
        float* s = logit.data() + ((b * Hq + h) * R + r) * W;  // [T text | I image], -inf off the row's keys
        float* f = part.data() + ((b * Hq + h) * R + r) * I;
        float* pr = p_row(b, h, e);
        std::fill(s, s + W, kNegInf);
        std::fill(f, f + I, 0.f);
        for (int64_t i = 0; i < I; ++i) pr[i * ps3] = 0.f;
        const bool ok = tl.ok[e * tl.so];
        const int64_t nt = ok ? tl.seen(tl.pos[e * tl.sp], st.data()) : 0;
        const int64_t ni = ok ? il.seen(tl.pos[e * tl.sp], si.data()) : 0;
        if (nt + ni == 0) continue;
        load_rows(qs, 1, 1, [&](int64_t) { return r; }, D, D, scale, qf.data());
        logits(qf.data(), 1, kts, [&](int64_t j) { return st[j]; }, nt, D, x.data(), et.data(), nt);
        logits(qf.data(), 1, kis, [&](int64_t j) { return si[j]; }, ni, D, x.data(), ei.data(), ni);
        float m = kNegInf;
        for (int64_t j = 0; j < nt; ++j) m = std::max(m, s[st[j]] = et[j]);
        for (int64_t j = 0; j < ni; ++j) m = std::max(m, s[T + si[j]] = ei[j]);
        const float inv = 1.f / (exp_sum(ops, et.data(), nt, m) + exp_sum(ops, ei.data(), ni, m));
        for (int64_t j = 0; j < ni; ++j) pr[si[j] * ps3] = ei[j] * inv;
        for (int64_t j = 0; j < nt; ++j) {  // (this row's P_ti row, written above, among them)
          const float* pt = p_row(b, h, st[j]);
          if (ps3 == 1) {
            axpy(et[j] * inv, pt, f, I);  // (the record's rows are contiguous: vectorised)
          } else {
            for (int64_t i = 0; i < I; ++i) f[i] += et[j] * inv * pt[i * ps3];
          }
        }
      }
    }
  });
  // 2. the head mean of the focus, each row's kept image keys
  at::parallel_for(0, B * R, grain_for(Hq * I), [&](int64_t lo, int64_t hi) {
    std::vector<float> focus(I);
    std::vector<int64_t> si(I);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / R, r = task % R, e = first + r;
      const Lists tl(text, text_ok, b), il(image, image_ok, b);
      uint8_t* k = kept.data() + task * I;
      std::fill(k, k + I, 0);
      const int64_t n = tl.ok[e * tl.so] ? il.seen(tl.pos[e * tl.sp], si.data()) : 0;
      if (n == 0) continue;
      std::fill(focus.begin(), focus.end(), 0.f);
      for (int64_t h = 0; h < Hq; ++h) {
        const float* f = part.data() + ((b * Hq + h) * R + r) * I;
        for (int64_t i = 0; i < I; ++i) focus[i] += f[i];
      }
      for (float& x : focus) x /= static_cast<float>(Hq);
      const int64_t budget = std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(keep * static_cast<double>(n))));
      // the highest focus first (NaN above every number), ties to the lower index
      auto before = [&](int64_t a, int64_t c) {
        const float fa = focus[a], fc = focus[c];
        if (std::isnan(fa) || std::isnan(fc)) return std::isnan(fa) && (!std::isnan(fc) || a < c);
        return fa > fc || (fa == fc && a < c);
      };
      if (budget < n) std::nth_element(si.begin(), si.begin() + budget, si.begin() + n, before);
      for (int64_t j = 0; j < std::min(budget, n); ++j) k[si[j]] = 1;
    }
  });
  // 3. the inhibited softmax and its values
  const float shift = weight == 0.0 ? kNegInf : static_cast<float>(std::log(weight));
  float* o = out.data_ptr<float>();  // [B, Hq, R, D]
  at::parallel_for(0, B * Hq * R, grain_for(W * D), [&](int64_t lo, int64_t hi) {
    std::vector<float> p(round_up(W, kBN)), x(D), acc(D);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task % R, bh = task / R, b = bh / Hq, h = bh % Hq;
      const float* s = logit.data() + task * W;
      const uint8_t* k = kept.data() + (b * R + r) * I;
      float m = kNegInf;
      for (int64_t j = 0; j < W; ++j) {
        p[j] = j >= T && !k[j - T] ? s[j] + shift : s[j];  // (-inf stays -inf)
        m = std::max(m, p[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      if (m > kNegInf) {
        total = exp_sum(ops, p.data(), W, m);
        const Slice<S> vts(v_t, b, h / rep), vis(v_i, b, h / rep);
        for (int64_t j = 0; j < W; ++j)
          if (p[j] != 0.f) axpy(p[j], j < T ? row_f32(vts, j, D, x.data()) : row_f32(vis, j - T, D, x.data()),
                                acc.data(), D);
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t c = 0; c < D; ++c) o[task * D + c] = acc[c] * inv;
    }
  });
}

void check(const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, kOp, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

at::Tensor cmai_step_cpu(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& text,
                         const at::Tensor& text_ok, const at::Tensor& k_i, const at::Tensor& v_i,
                         const at::Tensor& image, const at::Tensor& image_ok, at::Tensor p_ti, double keep,
                         double weight, double scale) {
  check_qk(kOp, q, k_t);
  const int64_t B = q.size(0), Hq = q.size(1), R = q.size(2), D = q.size(3), Hkv = k_t.size(1);
  const int64_t T = k_t.size(2), I = k_i.size(2);
  for (const auto& [name, t, n] : {std::tuple<const char*, const at::Tensor&, int64_t>{"v_t", v_t, T},
                                   {"k_i", k_i, I}, {"v_i", v_i, I}}) {
    check(name, t, 4);
    TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.size(0) == B && t.size(1) == Hkv && t.size(2) == n &&
                    t.size(3) == D,
                kOp, ": ", name, " must be ", q.scalar_type(), " [", B, ", ", Hkv, ", ", n, ", ", D, "], got ",
                t.scalar_type(), " ", t.sizes());
  }
  for (const auto& [name, t, n, type] :
       {std::tuple<const char*, const at::Tensor&, int64_t, at::ScalarType>{"text", text, T, at::kLong},
        {"text_ok", text_ok, T, at::kBool}, {"image", image, I, at::kLong}, {"image_ok", image_ok, I, at::kBool}}) {
    check(name, t, 2);
    TORCH_CHECK(t.scalar_type() == type && t.size(0) == B && t.size(1) == n, kOp, ": ", name, " must be ", type,
                " [", B, ", ", n, "], got ", t.scalar_type(), " ", t.sizes());
  }
  check("p_ti", p_ti, 4);
  TORCH_CHECK(p_ti.scalar_type() == at::kFloat && p_ti.size(0) == B && p_ti.size(1) == Hq && p_ti.size(2) == T &&
                  p_ti.size(3) == I,
              kOp, ": p_ti must be float32 [", B, ", ", Hq, ", ", T, ", ", I, "], got ", p_ti.scalar_type(), " ",
              p_ti.sizes());
  TORCH_CHECK(R <= T, kOp, ": q's ", R, " rows must be the last of the ", T, " text entries");
  TORCH_CHECK(I >= 1, kOp, ": the record must list at least one image entry");
  TORCH_CHECK(keep > 0.0 && keep <= 1.0, kOp, ": keep must be in (0, 1], got ", keep);
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, kOp, ": weight must be in [0, 1], got ", weight);
  auto out = at::empty({B, Hq, R, D}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  VTATTN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "vtattn_cmai_step_cpu", [&] {
    cmai_kernel<scalar_t>(q, k_t, v_t, text, text_ok, k_i, v_i, image, image_ok, p_ti, keep, weight,
                          static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("cmai_step", &vtattn::cpu::cmai_step_cpu); }
