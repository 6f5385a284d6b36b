// Shared pieces of the CPU kernels: dtype dispatch, argument checks, strided
// tile loads into fp32 scratch, and the fp32 tile operations (QK^T and PV
// micro-kernels, masked max / exp / sums over a key tile) that do the arithmetic.
//
// setup.py builds with plain -O3 (baseline x86-64 = SSE2), so the tile
// operations are written once over a GCC/Clang vector type of W floats and
// compiled per x86 level with that level's native width (AVX-512: 16,
// AVX2+FMA: 8, baseline: 4); tile_ops() picks one at first use. Loads and
// bookkeeping are cheap next to them and stay baseline.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define VTATTN_X86_LEVELS 1
#endif

// For simple loops that the compiler vectorises by itself (other kernels use
// it): clone the function for AVX-512 / AVX2 and let the loader pick (ifunc).
// Blocked micro-kernels use Tiles<W> below instead: auto-vectorised blocking
// is fragile, and a fixed vector width is lowered badly on narrower targets.
#ifndef VTATTN_MULTIVERSION
#if defined(VTATTN_X86_LEVELS) && defined(__linux__)
#define VTATTN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VTATTN_MULTIVERSION
#endif
#endif

// fp32, fp16 and bf16 only: the kernel contract (docs/internals.md).
#define VTATTN_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace vtattn::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kLanes = 16;  // D is padded to it: a whole number of every level's narrowest micro-kernel block
constexpr int64_t kRowGroup = 4;  // micro-kernel rows (hard-coded there); row blocks are padded to it
constexpr int64_t kBM = 64;  // query rows per block
constexpr int64_t kBN = 64;  // keys per tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// The arguments of the attention family that shape each row's softmax (docs/internals.md).
struct Opts {
  bool causal = false;
  float scale = 1.f;
  float softcap = 0.f;         // > 0: logits s -> softcap * tanh(s / softcap)
  int64_t window = -1;         // < 0: no left bound
  const float* sinks = nullptr;  // [Hq] fp32 logits joining every row's normaliser, or none

  float sink(int64_t h) const { return sinks ? sinks[h] : kNegInf; }
};

// Row i of a sequence of Nq rows over Nk keys sees keys [begin(i), end(i)): causal is end-aligned,
// a window keeps keys j >= i + Nk - Nq - window.
struct Visible {
  int64_t off, nk;  // off = Nk - Nq: row i's own position among the keys
  bool causal;
  int64_t window;
  Visible(const Opts& o, int64_t nq, int64_t nk_) : off(nk_ - nq), nk(nk_), causal(o.causal), window(o.window) {}
  int64_t begin(int64_t i) const { return window < 0 ? 0 : std::clamp<int64_t>(i + off - window, 0, nk); }
  int64_t end(int64_t i) const { return causal ? std::clamp<int64_t>(i + off + 1, 0, nk) : nk; }
};

// Checks the option arguments of the attention-family kernels; messages name the argument.
inline void check_opts(const char* op, double softcap, int64_t window, const std::optional<at::Tensor>& sinks,
                       int64_t Hq) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = off), got ",
              softcap);
  TORCH_CHECK(window >= -1, op, ": window must be >= 0, or -1 for none, got ", window);
  if (sinks) {
    TORCH_CHECK(sinks->device().is_cpu() && sinks->scalar_type() == at::kFloat && sinks->dim() == 1 &&
                    sinks->size(0) == Hq && sinks->is_contiguous(),
                op, ": sinks must be a contiguous CPU float32 [Hq] tensor with Hq = ", Hq, ", got ",
                sinks->scalar_type(), " ", sinks->sizes(), " on ", sinks->device());
  }
}

inline Opts make_opts(bool causal, double scale, double softcap, int64_t window,
                      const std::optional<at::Tensor>& sinks) {
  return Opts{causal, static_cast<float>(scale), static_cast<float>(softcap), window,
              sinks ? sinks->const_data_ptr<float>() : nullptr};
}

// Checks shared by attention and key_importance; messages name the argument.
inline void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [B, H, N, D], got shape ", t.sizes());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k batch ", k.size(0), " != q batch ", q.size(0));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
              ") must be a multiple of k heads (", k.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k head dim ", k.size(3), " != q head dim ", q.size(3));
}

// One (b, h) slice [N, D] of a 4-D tensor, read through its strides.
template <typename T>
struct Slice {
  const T* base;
  int64_t sn, sd;
  Slice(const at::Tensor& t, int64_t b, int64_t h)
      : base(t.const_data_ptr<T>() + b * t.stride(0) + h * t.stride(1)), sn(t.stride(2)), sd(t.stride(3)) {}
  const T* row(int64_t i) const { return base + i * sn; }
};

// dst[r, :] = mul * src.row(row_of(r))[:d] as fp32 for r < n; the padding
// (columns d..ld, rows n..n_pad) is zeroed so it adds nothing to dot products.
template <typename T, typename RowOf>
void load_rows(const Slice<T>& src, int64_t n, int64_t n_pad, RowOf row_of, int64_t d, int64_t ld, float mul,
               float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* x = src.row(row_of(r));
    float* y = dst + r * ld;
    if (src.sd == 1) {  // the common case, as its own loop so that it vectorises
      for (int64_t c = 0; c < d; ++c) y[c] = mul * static_cast<float>(x[c]);
    } else {
      for (int64_t c = 0; c < d; ++c) y[c] = mul * static_cast<float>(x[c * src.sd]);
    }
    std::fill(y + d, y + ld, 0.f);
  }
  std::fill(dst + n * ld, dst + n_pad * ld, 0.f);
}

// Keys j0..j0+n of a [N, D] slice, transposed into kt[dp, kBN] (so the QK^T
// micro-kernel streams rows of kt); unused columns and padded rows are zero.
template <typename T>
void load_keys_t(const Slice<T>& k, int64_t j0, int64_t n, int64_t d, int64_t dp, float* kt) {
  if (n < kBN || d < dp) std::fill(kt, kt + dp * kBN, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const T* x = k.row(j0 + j);
    for (int64_t c = 0; c < d; ++c) kt[c * kBN + j] = static_cast<float>(x[c * k.sd]);
  }
}

namespace {

#define VTATTN_INLINE inline __attribute__((always_inline))

// Tiles<8> and Tiles<16> pass vectors by value; they are only ever inlined into
// the matching target's wrappers, so GCC's ABI note about them does not apply.
// GCC issues the note at the end of the translation unit, so it stays off from
// here on (it only concerns vector arguments in functions like these).
#pragma GCC diagnostic ignored "-Wpsabi"

// A GCC/Clang vector of W Ts (its own template: GCC drops the attribute from a
// typedef that depends on the enclosing class template's parameter).
// may_alias: tiles are float arrays read and written as vectors.
template <typename T, int W>
struct VecOf {
  typedef T type __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T)), may_alias));
};

// The tile operations over vectors of W floats. Every function is
// always_inline so that it is compiled inside the per-level wrappers below,
// with their instruction set. Tile rows are kBN floats; `n` is the number of
// valid (visible) entries at the front of a row.
template <int W>
struct Tiles {
  using Vec = typename VecOf<float, W>::type;
  using IVec = typename VecOf<int32_t, W>::type;
  // Vectors per micro-kernel row. AVX-512 keeps 4 x 4 accumulators (of its 32 registers): two FMAs a cycle at
  // four cycles' latency need 8 in flight, and each loaded key (value) vector then feeds 4 FMAs, each broadcast
  // query (probability) 4; 4 x 1 ran at ~45 GF/s, half of aten's flash attention. Narrower sets: kLanes / W.
  static constexpr int64_t kVecs = W == 16 ? 4 : kLanes / W;
  static constexpr int64_t kCols = kVecs * W;  // columns per micro-kernel block (kBN % kCols == 0)
  static_assert(kBN % kCols == 0 && kCols % kLanes == 0, "a tile is whole blocks");

  VTATTN_INLINE static Vec load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
  VTATTN_INLINE static void store(float* p, Vec x) { *reinterpret_cast<Vec*>(p) = x; }
  VTATTN_INLINE static Vec splat(float x) { return Vec{} + x; }
  // Lane l of the vector at offset j is valid when lo <= j + l < hi.
  VTATTN_INLINE static IVec valid(int64_t j, int64_t lo, int64_t hi) {
    alignas(64) static constexpr int32_t kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const IVec idx = *reinterpret_cast<const IVec*>(kIota);  // one load (a lane-by-lane build took ~20 instructions)
    return (idx >= static_cast<int32_t>(lo - j)) & (idx < static_cast<int32_t>(hi - j));
  }
  // x where its lanes lie in [lo, hi) (the vector at offset j), fill elsewhere; a vector wholly inside takes no mask.
  VTATTN_INLINE static Vec visible(Vec x, int64_t j, int64_t lo, int64_t hi, Vec fill) {
    return lo <= j && j + W <= hi ? x : valid(j, lo, hi) ? x : fill;
  }
  // A vector's lanes folded pairwise (log2 W dependent steps, not W: each row of a tile pays this latency).
  template <typename Op>
  VTATTN_INLINE static float fold(Vec x, Op op) {
    float t[W];
    store(t, x);
    for (int w = W / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) t[l] = op(t[l], t[l + w]);
    return t[0];
  }
  VTATTN_INLINE static float hsum(Vec x) {
    return fold(x, [](float a, float b) { return a + b; });
  }

  // exp(x): Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, degree-7 Taylor
  // polynomial, 2^k built in the exponent bits; relative error < 1e-7 (about
  // 2 ulp). exp(-inf) = 0, NaN propagates, results below FLT_MIN flush to 0
  // (< 1e-38 of the row maximum, which contributes 1), x > 88 saturates.
  VTATTN_INLINE static Vec exp(Vec x) {
    Vec xc = x > -88.f ? x : splat(-88.f);  // NaN also lands here; restored below
    xc = xc < 88.f ? xc : splat(88.f);
    const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const Vec k = (xc * 1.44269504f + shifter) - shifter;
    const Vec r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
    Vec p = splat(1.f / 5040.f);
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const IVec bits = (__builtin_convertvector(k, IVec) + 127) << 23;
    const Vec e = x < -87.3f ? Vec{} : p * (Vec)bits;
    return x == x ? e : x;
  }

  // tanh(x) to a few ulp: an odd Taylor polynomial below |x| = 0.3 (terms past x^11 are
  // < 1e-8 relative there), else (1 - e) / (1 + e) with e = exp(-2|x|), which no longer loses
  // bits to cancellation. NaN propagates, +-inf give +-1.
  VTATTN_INLINE static Vec tanh(Vec x) {
    const Vec a = x < 0.f ? -x : x;
    const Vec x2 = x * x;
    Vec p = splat(-1382.f / 155925.f);
    p = p * x2 + 62.f / 2835.f;
    p = p * x2 - 17.f / 315.f;
    p = p * x2 + 2.f / 15.f;
    p = p * x2 - 1.f / 3.f;
    p = p * x2 + 1.f;
    const Vec e = exp(-2.f * a);
    const Vec t = (1.f - e) / (1.f + e);
    return a < 0.3f ? x * p : (x < 0.f ? -t : t);
  }

  // s[m, kBN] = q[m, dp] . kt[dp, kBN]; m % kRowGroup == 0, dp % kLanes == 0.
  // A kRowGroup x kCols accumulator block stays in registers for a whole dot product.
  VTATTN_INLINE static void qk(const float* __restrict q, int64_t m, int64_t dp, const float* __restrict kt,
                               float* __restrict s) {
    static_assert(kRowGroup == 4, "the micro-kernels are written for 4 rows");
    for (int64_t i = 0; i < m; i += kRowGroup) {
      const float* qi = q + i * dp;
      for (int64_t j0 = 0; j0 < kBN; j0 += kCols) {
        Vec c[kRowGroup][kVecs] = {};
        for (int64_t d = 0; d < dp; ++d) {
          Vec kr[kVecs];
          for (int64_t v = 0; v < kVecs; ++v) kr[v] = load(kt + d * kBN + j0 + v * W);
          for (int64_t r = 0; r < kRowGroup; ++r) {
            const float a = qi[r * dp + d];
            for (int64_t v = 0; v < kVecs; ++v) c[r][v] += a * kr[v];
          }
        }
        for (int64_t r = 0; r < kRowGroup; ++r)
          for (int64_t v = 0; v < kVecs; ++v) store(s + (i + r) * kBN + j0 + v * W, c[r][v]);
      }
    }
  }

  // acc[m, dp] += p[m, kBN] . v[kBN, dp]; same blocking as qk, in kCols-wide column blocks of dp and
  // W-wide ones for the rest (dp % kLanes == 0 only).
  VTATTN_INLINE static void pv(const float* __restrict p, int64_t m, const float* __restrict v, int64_t dp,
                               float* __restrict acc) {
    for (int64_t i = 0; i < m; i += kRowGroup) {
      int64_t d0 = 0;
      for (; d0 + kCols <= dp; d0 += kCols) pv_block<kVecs>(p + i * kBN, v + d0, dp, acc + i * dp + d0);
      for (; d0 < dp; d0 += W) pv_block<1>(p + i * kBN, v + d0, dp, acc + i * dp + d0);
    }
  }

  // The kRowGroup x NV vectors of acc (rows dp apart) += p's kRowGroup rows . v's NV column vectors.
  template <int64_t NV>
  VTATTN_INLINE static void pv_block(const float* __restrict p, const float* __restrict v, int64_t dp,
                                     float* __restrict acc) {
    Vec c[kRowGroup][NV];
    for (int64_t r = 0; r < kRowGroup; ++r)
      for (int64_t u = 0; u < NV; ++u) c[r][u] = load(acc + r * dp + u * W);
    for (int64_t j = 0; j < kBN; ++j) {
      Vec vr[NV];
      for (int64_t u = 0; u < NV; ++u) vr[u] = load(v + j * dp + u * W);
      for (int64_t r = 0; r < kRowGroup; ++r) {
        const float a = p[r * kBN + j];
        for (int64_t u = 0; u < NV; ++u) c[r][u] += a * vr[u];
      }
    }
    for (int64_t r = 0; r < kRowGroup; ++r)
      for (int64_t u = 0; u < NV; ++u) store(acc + r * dp + u * W, c[r][u]);
  }

  // x[0, n) = softcap * tanh(x / softcap); n % W == 0.
  VTATTN_INLINE static void softcap(float* x, int64_t n, float cap) {
    const float inv = 1.f / cap;
    for (int64_t j = 0; j < n; j += W) store(x + j, cap * tanh(load(x + j) * inv));
  }

  // Max of x[lo, hi), -inf when empty. NaNs are skipped (maxps semantics);
  // RowStats::add makes sure they still reach the output.
  VTATTN_INLINE static float max_of(const float* x, int64_t lo, int64_t hi) {
    Vec lane = splat(kNegInf);
    for (int64_t j = 0; j < kBN; j += W) {
      if (j >= hi || j + W <= lo) continue;  // (a causal tile's rows see part of it)
      const Vec xj = visible(load(x + j), j, lo, hi, splat(kNegInf));
      lane = xj > lane ? xj : lane;
    }
    return fold(lane, [](float a, float b) { return a > b ? a : b; });  // (no lane holds NaN)
  }

  // x[j] = exp(x[j] - shift) for lo <= j < hi, 0 elsewhere in [0, kBN); returns their sum.
  VTATTN_INLINE static float exp_shift_sum(float* x, int64_t lo, int64_t hi, float shift) {
    Vec sum{};
    for (int64_t j = 0; j < kBN; j += W) {
      if (j >= hi || j + W <= lo) {
        store(x + j, Vec{});
        continue;
      }
      const Vec kept = visible(exp(load(x + j) - shift), j, lo, hi, Vec{});
      store(x + j, kept);
      sum += kept;
    }
    return hsum(sum);
  }

  // acc[j] += exp(x[r, j] - shift[r]) for each row r < m (rows ld apart) with lo[r] <= j < hi[r], summed in row
  // order. One call a block of rows: their exps interleave, and vectors a row does not see are skipped.
  VTATTN_INLINE static void add_exp_rows(const float* x, int64_t ld, int64_t m, const int64_t* lo, const int64_t* hi,
                                         const float* shift, float* acc) {
    for (int64_t j = 0; j < kBN; j += W) {
      Vec sum = load(acc + j);
      for (int64_t r = 0; r < m; ++r) {
        if (j >= hi[r] || j + W <= lo[r]) continue;
        sum += visible(exp(load(x + r * ld + j) - shift[r]), j, lo[r], hi[r], Vec{});
      }
      store(acc + j, sum);
    }
  }
};

// Dot product in kLanes partial sums (vectorised), summed pairwise (a short dependency chain, not
// kLanes serial adds) in an order that does not depend on the vectors' addresses: identical inputs
// give bitwise-identical results (merge_tokens' ties).
[[maybe_unused]] VTATTN_MULTIVERSION float dot_fixed_order(const float* __restrict a, const float* __restrict b,
                                                          int64_t n) {
  float lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[d + l] * b[d + l];
  for (int64_t l = 0; d + l < n; ++l) lane[l] += a[d + l] * b[d + l];
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

// dot_fixed_order(a, x[k], n) for k < 4, each summed exactly as it sums: four independent chains, so
// one row's add latency hides behind the others' (one row at a time is latency-bound: a decode
// step's keys against a single query).
[[maybe_unused]] VTATTN_MULTIVERSION void dot4_fixed_order(const float* __restrict a, const float* const* x, int64_t n,
                                                          float* __restrict out) {
  const float *__restrict x0 = x[0], *__restrict x1 = x[1], *__restrict x2 = x[2], *__restrict x3 = x[3];
  float l0[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, l3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      l0[l] += a[d + l] * x0[d + l];
      l1[l] += a[d + l] * x1[d + l];
      l2[l] += a[d + l] * x2[d + l];
      l3[l] += a[d + l] * x3[d + l];
    }
  for (int64_t l = 0; d + l < n; ++l) {
    l0[l] += a[d + l] * x0[d + l];
    l1[l] += a[d + l] * x1[d + l];
    l2[l] += a[d + l] * x2[d + l];
    l3[l] += a[d + l] * x3[d + l];
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) {
      l0[l] += l0[l + w];
      l1[l] += l1[l + w];
      l2[l] += l2[l + w];
      l3[l] += l3[l + w];
    }
  out[0] = l0[0], out[1] = l1[0], out[2] = l2[0], out[3] = l3[0];
}

// y[0, n) += a * x[0, n): a value row into one query row's accumulator.
[[maybe_unused]] VTATTN_MULTIVERSION void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] += a * x[c];
}

// One set of tile operations, compiled for one instruction set.
struct TileOps {
  void (*qk)(const float*, int64_t, int64_t, const float*, float*);
  void (*pv)(const float*, int64_t, const float*, int64_t, float*);
  void (*softcap)(float*, int64_t, float);
  float (*max_of)(const float*, int64_t, int64_t);
  float (*exp_shift_sum)(float*, int64_t, int64_t, float);
  void (*add_exp_rows)(const float*, int64_t, int64_t, const int64_t*, const int64_t*, const float*, float*);
  const char* name;  // the level: `python -m vtattn info` and the tests read it (vtattn_C::cpu_tile_level)
};

// Non-inline wrappers of Tiles<W> carrying the target attribute ATTR.
#define VTATTN_TILE_OPS(NAME, ATTR, W)                                                                          \
  ATTR void NAME##_qk(const float* q, int64_t m, int64_t dp, const float* kt, float* s) {                     \
    Tiles<W>::qk(q, m, dp, kt, s);                                                                            \
  }                                                                                                           \
  ATTR void NAME##_pv(const float* p, int64_t m, const float* v, int64_t dp, float* acc) {                    \
    Tiles<W>::pv(p, m, v, dp, acc);                                                                           \
  }                                                                                                           \
  ATTR void NAME##_softcap(float* x, int64_t n, float cap) { Tiles<W>::softcap(x, n, cap); }                 \
  ATTR float NAME##_max_of(const float* x, int64_t lo, int64_t hi) { return Tiles<W>::max_of(x, lo, hi); }    \
  ATTR float NAME##_exp_shift_sum(float* x, int64_t lo, int64_t hi, float shift) {                            \
    return Tiles<W>::exp_shift_sum(x, lo, hi, shift);                                                         \
  }                                                                                                           \
  ATTR void NAME##_add_exp_rows(const float* x, int64_t ld, int64_t m, const int64_t* lo, const int64_t* hi,   \
                                 const float* shift, float* acc) {                                            \
    Tiles<W>::add_exp_rows(x, ld, m, lo, hi, shift, acc);                                                     \
  }                                                                                                           \
  const TileOps NAME{NAME##_qk, NAME##_pv, NAME##_softcap, NAME##_max_of, NAME##_exp_shift_sum,               \
                     NAME##_add_exp_rows, #NAME};

VTATTN_TILE_OPS(baseline, , 4)
#ifdef VTATTN_X86_LEVELS
VTATTN_TILE_OPS(avx2, __attribute__((target("avx2,fma"))), 8)
VTATTN_TILE_OPS(avx512, __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))), 16)
#endif

// The best set this CPU runs. VTATTN_CPU_ISA=baseline|avx2 caps it (read at
// first use), so tests can cover every set on one machine (tests/test_cpu_levels.py).
[[maybe_unused]] const TileOps& tile_ops() {
  static const TileOps& ops = []() -> const TileOps& {
    const char* cap = std::getenv("VTATTN_CPU_ISA");
    const std::string want = cap && *cap ? cap : "avx512";  // unset or empty: no cap
    TORCH_CHECK(want == "avx512" || want == "avx2" || want == "baseline",
                "VTATTN_CPU_ISA must be avx512, avx2 or baseline (a cap on the C++ CPU kernels' instruction set), got '",
                want, "'");
#ifdef VTATTN_X86_LEVELS
    __builtin_cpu_init();
    if (want == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return avx512;
    if (want != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2;
#endif
    return baseline;
  }();
  return ops;
}

}  // namespace

// Log-sum-exp of the visible logits of one row across key tiles, folded a tile
// at a time (the online softmax statistics without the output accumulator).
struct RowStats {
  float max = kNegInf;
  float sum = 0.f;

  // Adds the tile row s[0, kBN) of which s[lo, hi) are visible logits; leaves
  // exp(s - new max) there and zeros elsewhere. Returns the factor that rescales
  // anything accumulated against the old max.
  float add(const TileOps& ops, float* s, int64_t lo, int64_t hi) {
    const float m_new = std::max(max, ops.max_of(s, lo, hi));  // stays NaN once NaN
    if (m_new == kNegInf) {
      // Every logit so far is -inf or NaN: exp gives 0 unless one is NaN,
      // which must poison the row (max_of skipped it).
      if (std::any_of(s + std::min(lo, hi), s + hi, [](float x) { return x != x; }))
        max = sum = std::numeric_limits<float>::quiet_NaN();
      std::fill(s, s + kBN, 0.f);
      return max == max ? 1.f : max;
    }
    const float alpha = std::exp(max - m_new);
    sum = sum * alpha + ops.exp_shift_sum(s, lo, hi, m_new);
    max = m_new;
    return alpha;
  }
  float add(const TileOps& ops, float* s, int64_t n) { return add(ops, s, 0, n); }
  bool empty() const { return max == kNegInf; }  // no visible key so far

  // With a sink logit (-inf = none) joining the denominator: the row's lse, and the factor that
  // turns what was accumulated against `max` into probabilities. Without sink and keys: -inf, 0.
  float lse(float sink = kNegInf) const {
    const float m = top(sink);
    if (m == kNegInf) return kNegInf;
    return m + std::log(sum * std::exp(max - m) + std::exp(sink - m));
  }
  float norm(float sink = kNegInf) const {
    const float m = top(sink);
    if (m == kNegInf) return 0.f;
    const float scaled = std::exp(max - m);  // 0 for a row without keys: out 0
    return scaled / (sum * scaled + std::exp(sink - m));
  }

 private:
  float top(float sink) const { return max != max || sink != sink ? max + sink : std::max(max, sink); }
};

// fp32 scratch left uninitialised: every kernel writes what it reads (load_rows / load_keys_t zero
// their padding, qk writes whole logit rows, acc is filled per task); zeroing it on allocation cost
// a decode step's call ~2 us.
struct Scratch {
  std::unique_ptr<float[]> p;
  int64_t n;
  explicit Scratch(int64_t size) : p(new float[size]), n(size) {}
  float* data() const { return p.get(); }
  float* begin() const { return p.get(); }
  float* end() const { return p.get() + n; }
  float& operator[](int64_t i) const { return p[i]; }
};

// One thread's scratch for a block of up to `rows` (<= kBM, a multiple of kRowGroup) query rows of
// flash-style attention; a decode step's single query needs kRowGroup.
// One head's k^T tiles (and v tiles, given vs) as fp32, converted on first use and kept for the next
// task on that head (a chunk's tasks go row block by row block of a head; converting a tile costs
// about a third of its QK^T and PV), up to kHeldBytes, else one tile at a time. The head is named by
// its slices' addresses and key range [k0, k0 + Nk).
constexpr int64_t kHeldBytes = int64_t{16} << 20;
class HeldTiles {
 public:
  // (k^T tile [dp, kBN], v tile [kBN, dp] or nullptr) of keys k0 + j0 ..
  template <typename T>
  std::pair<const float*, const float*> get(const Slice<T>& ks, const Slice<T>* vs, int64_t k0, int64_t Nk,
                                            int64_t j0, int64_t D, int64_t dp) {
    const int64_t tiles = ceil_div(Nk, kBN), tile = dp * kBN, n = std::min(kBN, Nk - j0);
    const bool keep = (vs ? 2 : 1) * tiles * tile * static_cast<int64_t>(sizeof(float)) <= kHeldBytes;
    const Key key{ks.base, vs ? vs->base : nullptr, k0, Nk};
    if (!keep || key != held_) {
      held_ = keep ? key : Key{nullptr, nullptr, 0, 0};
      have_.assign(keep ? tiles : 1, 0);
      kt_.resize((keep ? tiles : 1) * tile);
      if (vs) vb_.resize((keep ? tiles : 1) * tile);
    }
    const int64_t t = keep ? j0 / kBN : 0;
    float* kt = kt_.data() + t * tile;
    float* vb = vs ? vb_.data() + t * tile : nullptr;
    if (!have_[t]) {
      load_keys_t(ks, k0 + j0, n, D, dp, kt);
      if (vs) load_rows(*vs, n, kBN, [&](int64_t r) { return k0 + j0 + r; }, D, dp, 1.f, vb);
      have_[t] = 1;
    }
    return {kt, vb};
  }

 private:
  using Key = std::tuple<const void*, const void*, int64_t, int64_t>;
  std::vector<float> kt_, vb_;
  std::vector<char> have_;
  Key held_{nullptr, nullptr, 0, 0};
};

struct BlockScratch {
  Scratch qb, kt, vb, s, acc;  // scaled q rows, k^T tile, v tile (kernels that list their keys), logits, output
  RowStats stats[kBM];
  HeldTiles held;  // a head's k^T and v tiles (attend_block)
  explicit BlockScratch(int64_t dp, int64_t rows = kBM)
      : qb(rows * dp), kt(dp * kBN), vb(kBN * dp), s(rows * kBN), acc(rows * dp) {}
};

// One thread's scratch for a single query row (attend_row), in one allocation: the scaled query, four
// key or value rows as fp32, a chunk of kBN logits and the output accumulator.
struct RowScratch {
  Scratch buf;
  float *q, *x, *s, *acc;
  explicit RowScratch(int64_t d) : buf(6 * d + kBN), q(buf.data()), x(q + d), s(x + 4 * d), acc(s + kBN) {}
};

// Row j of `src` (anything with row(j) and sd: a Slice, a paged cache's rows) as fp32: the row itself
// when it is fp32 with unit stride, else converted into buf[0, d).
template <typename Rows>
const float* row_f32(const Rows& src, int64_t j, int64_t d, float* buf) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(src.row(j))>>;
  const T* x = src.row(j);
  if (src.sd == 1) {
    if constexpr (std::is_same_v<T, float>) return x;
    for (int64_t c = 0; c < d; ++c) buf[c] = static_cast<float>(x[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) buf[c] = static_cast<float>(x[c * src.sd]);
  }
  return buf;
}

// Query rows a kernel's scratch needs for Nq queries in blocks of kBM.
inline int64_t block_rows(int64_t Nq) { return std::min(kBM, round_up(std::max<int64_t>(Nq, 1), kRowGroup)); }

// at::parallel_for's grain for tasks of about `cost` multiply-adds each: work below ~64k
// multiply-adds (a decode step's few heads) runs inline, where waking the thread pool would cost
// more than the work.
inline int64_t grain_for(int64_t cost) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cost, 1)); }

// Rows i0 .. i0 + m - 1 of a sequence of Nq queries (scaled, in w.qb, mp = m padded) against its
// Nk keys, which start at row k0 of ks / vs: the online softmax into w.acc and w.stats, with the
// visibility and softcap of `o`. Shared by the dense and varlen kernels.
template <typename T>
void attend_block(const TileOps& ops, const Slice<T>& ks, const Slice<T>& vs, int64_t k0, int64_t i0, int64_t m,
                  int64_t mp, int64_t Nq, int64_t Nk, const Opts& o, int64_t D, int64_t dp, BlockScratch& w) {
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.stats, w.stats + kBM, RowStats{});
  // The block's first row sees the earliest key, its last row the latest: tiles outside are skipped.
  const Visible vis(o, Nq, Nk);
  const int64_t kend = vis.end(i0 + m - 1);
  for (int64_t j0 = vis.begin(i0) / kBN * kBN; j0 < kend; j0 += kBN) {
    const int64_t n = std::min(kBN, Nk - j0);
    const auto [kt, vb] = w.held.get(ks, &vs, k0, Nk, j0, D, dp);
    ops.qk(w.qb.data(), mp, dp, kt, w.s.data());
    if (o.softcap > 0.f) ops.softcap(w.s.data(), mp * kBN, o.softcap);
    for (int64_t r = 0; r < m; ++r) {
      const int64_t lo = std::clamp<int64_t>(vis.begin(i0 + r) - j0, 0, n);
      const int64_t hi = std::clamp<int64_t>(vis.end(i0 + r) - j0, 0, n);
      // the row then holds unnormalised probabilities, 0 for masked and padded keys
      const float alpha = w.stats[r].add(ops, w.s.data() + r * kBN, lo, hi);
      if (alpha != 1.f)
        for (int64_t c = 0; c < dp; ++c) w.acc[r * dp + c] *= alpha;
    }
    ops.pv(w.s.data(), mp, vb, dp, w.acc.data());
  }
}

// Logits of `rows` fp32 query rows (q, D apart) against the keys key_of(j), j < n, of ks, into
// s[r * ns + j]: four keys at a time (four independent dot products, dot4_fixed_order: one at a time
// waits on its own adds), the rest one by one; x: scratch for four rows of D.
template <typename Rows, typename KeyOf>
void logits(const float* q, int64_t rows, const Rows& ks, KeyOf key_of, int64_t n, int64_t D, float* x, float* s,
            int64_t ns) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k4[4];
    for (int64_t i = 0; i < 4; ++i) k4[i] = row_f32(ks, key_of(j + i), D, x + i * D);
    for (int64_t r = 0; r < rows; ++r) dot4_fixed_order(q + r * D, k4, D, s + r * ns + j);
  }
  for (; j < n; ++j) {
    const float* k1 = row_f32(ks, key_of(j), D, x);
    for (int64_t r = 0; r < rows; ++r) s[r * ns + j] = dot_fixed_order(q + r * D, k1, D);
  }
}

// One query row (scaled, fp32, in w.q) against the keys key_of(j) of ks / vs for j in [lo, hi),
// except those with masked(j): the online softmax of attend_block over chunks of kBN keys, but with
// one dot product per key instead of tiles (a decode step's single row would fill 4-row
// micro-kernels and transposed 64-key tiles mostly with padding). Leaves the unnormalised output in
// w.acc[0, D) and the row's statistics in st.
template <typename T, typename KeyOf, typename Masked>
void attend_row(const TileOps& ops, const Slice<T>& ks, const Slice<T>& vs, int64_t lo, int64_t hi, KeyOf key_of,
                Masked masked, float softcap, int64_t D, RowScratch& w, RowStats& st) {
  st = RowStats{};
  std::fill(w.acc, w.acc + D, 0.f);
  for (int64_t j0 = lo; j0 < hi; j0 += kBN) {
    const int64_t n = std::min(kBN, hi - j0);
    logits(w.q, 1, ks, [&](int64_t j) { return key_of(j0 + j); }, n, D, w.x, w.s, kBN);
    std::fill(w.s + n, w.s + kBN, 0.f);  // the tile operations read whole kBN rows
    if (softcap > 0.f) ops.softcap(w.s, round_up(n, kLanes), softcap);
    for (int64_t j = 0; j < n; ++j)
      if (masked(j0 + j)) w.s[j] = kNegInf;
    const float alpha = st.add(ops, w.s, n);  // w.s then holds unnormalised probabilities
    if (alpha != 1.f)
      for (int64_t c = 0; c < D; ++c) w.acc[c] *= alpha;
    for (int64_t j = 0; j < n; ++j) axpy(w.s[j], row_f32(vs, key_of(j0 + j), D, w.x), w.acc, D);
  }
}

}  // namespace vtattn::cpu
