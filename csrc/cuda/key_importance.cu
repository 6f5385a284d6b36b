// CUDA launcher and kernels of vtattn_C::key_importance: scores[b, h, j] = sum over the chosen
// query rows i of attention's probabilities P[i, j] (softmax of the scaled, optionally softcapped
// logits over the visible keys, sinks joining the denominator), without materialising [Nq, Nk].
// Three paths:
//
//  few rows (R <= 16, any dtype; the [CLS] row, FastV's last token): memory-bound, K read once.
//    Kernel 1 (SIMT, 16-byte loads) writes the rows' logits of a key chunk to a small fp32 buffer
//    plus per-chunk (max, sum-exp) partials; kernel 2 turns the partials (or the given lse) into
//    each row's lse and writes sum_r exp(logit - lse_r).
//  many rows with lse (fp16/bf16): a column kernel on tensor cores. Each CTA keeps a 128-key tile
//    of K in registers and loops over the query rows (gathered by index) in tiles, summing
//    exp(s - lse_row) per key. Deterministic: no atomics, each key owned by one CTA.
//  many rows without lse (fp16/bf16): the flash kernel in LSE-only mode computes the needed rows'
//    lse (csrc/include/flash_fwd.cuh), then the column kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "flash_fwd.cuh"
#include "host_checks.h"
#include "launch_utils.cuh"

namespace vtattn {
namespace {

// Threads, tiles and the paths' grids: csrc/include/launch_plan.h (plan::key_importance).
using plan::kFewRows;            // at most this many rows take the few-rows path
constexpr int kFewMaxD = 128;    // staged q row width of the few-rows kernel (>= every head dim)

// Query row at position `pos` of `rows` ([nrows] of one batch, nullptr = identity), or -1 when the
// position is past the end or holds a skipped (-1) / out-of-range index.
__device__ __forceinline__ int row_at(const int64_t* rows, int pos, int nrows, int Nq) {
  if (pos >= nrows) return -1;
  if (!rows) return pos;
  const int64_t i = rows[pos];
  return (i >= 0 && i < Nq) ? static_cast<int>(i) : -1;
}

// ---------------------------------------------------------------------------------------------
// Few rows: kernel 1, logits of R rows against one chunk of keys.

struct FewRowsParams {
  const void* q;
  const void* k;
  const int64_t* rows;  // [B, R] contiguous, nullptr = rows 0..R-1
  float* logits;        // [B * Hq, R, Nk], log2 domain (scale * log2e folded in), invisible keys -inf
  float2* part;         // [B * Hq, R, nchunks]: (max, sum exp2(logit - max)) per chunk; nullptr = skip
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn;
  int R, Nq, Nk, Hq, D, group, nchunks;
  bool causal;
  float scale_log2;
  float cap_in, cap_out;  // softcap c: logit x (log2) -> cap_out * tanh_from_2u_log2e(x * cap_in); cap_out 0 = off
  int window;             // -1 = none
};

// TPK threads share one key: each loads 16 bytes of its row (D <= TPK * 16 / sizeof(T)) and the
// partial dot products are summed with shuffles. Every thread keeps KPT keys' loads in flight.
using plan::kFewThreads;
using plan::kFewKeysPerThread;
template <int TPK> constexpr int few_chunk_keys() { return kFewThreads / TPK * kFewKeysPerThread; }

template <typename T, int TPK>
__global__ void __launch_bounds__(kFewThreads) few_rows_logits_kernel(const FewRowsParams p) {
  constexpr int NT = kFewThreads, VEC = 16 / sizeof(T), KPP = NT / TPK, KPT = kFewKeysPerThread;
  constexpr int KC = few_chunk_keys<TPK>();
  static_assert(TPK * VEC <= kFewMaxD && KC % 32 == 0, "q slices stay inside s_q; warps split KC evenly");
  __shared__ __align__(16) float s_q[kFewRows][kFewMaxD];  // scaled q rows, zero past D
  __shared__ float s_logit[kFewRows][KC];
  __shared__ int s_row[kFewRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, chunk = blockIdx.y, key0 = chunk * KC;
  const int b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const int64_t* rows = p.rows ? p.rows + static_cast<int64_t>(b) * p.R : nullptr;

  // Issue the K loads first: they are what this kernel waits on.
  const int kg = tid / TPK, lk = tid % TPK;
  const bool has_cols = lk * VEC < p.D;
  uint4 kv[KPT];
#pragma unroll
  for (int pp = 0; pp < KPT; ++pp) {
    const int j = key0 + kg + pp * KPP;
    kv[pp] = (j < p.Nk && has_cols) ? __ldg(reinterpret_cast<const uint4*>(k + j * p.k_sn + lk * VEC))
                                    : make_uint4(0u, 0u, 0u, 0u);
  }
  for (int idx = tid; idx < p.R * kFewMaxD; idx += NT) {
    const int r = idx / kFewMaxD, d = idx % kFewMaxD, i = row_at(rows, r, p.R, p.Nq);
    s_q[r][d] = (i >= 0 && d < p.D) ? to_float(q[i * p.q_sn + d]) * p.scale_log2 : 0.f;
  }
  if (tid < p.R) s_row[tid] = row_at(rows, tid, p.R, p.Nq);
  __syncthreads();

  const int off = p.Nk - p.Nq;  // causal: key j is visible to row i iff j <= i + off
#pragma unroll
  for (int pp = 0; pp < KPT; ++pp) {
    const int jj = kg + pp * KPP, j = key0 + jj;
    float kf[VEC];
    unpack16<T>(kv[pp], kf);
    for (int r = 0; r < p.R; ++r) {
      const float4* qv = reinterpret_cast<const float4*>(&s_q[r][lk * VEC]);
      float dot = 0.f;
#pragma unroll
      for (int v = 0; v < VEC / 4; ++v) {
        const float4 x = qv[v];
        dot += kf[4 * v] * x.x + kf[4 * v + 1] * x.y + kf[4 * v + 2] * x.z + kf[4 * v + 3] * x.w;
      }
#pragma unroll
      for (int o = TPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (lk == 0) {
        const int i = s_row[r];
        const bool visible =
            j < p.Nk && i >= 0 && !(p.causal && j > i + off) && !(p.window >= 0 && j < i + off - p.window);
        // not tanhf: --use_fast_math makes it tanh.approx (2^-11), too coarse for fp32 scores
        if (p.cap_out > 0.f) dot = p.cap_out * tanh_from_2u_log2e(dot * p.cap_in);
        s_logit[r][jj] = visible ? dot : -INFINITY;
      }
    }
  }
  __syncthreads();

  float* logits = p.logits + static_cast<int64_t>(bh) * p.R * p.Nk;
  for (int idx = tid; idx < p.R * KC; idx += NT) {
    const int r = idx / KC, jj = idx % KC, j = key0 + jj;
    if (j < p.Nk) logits[static_cast<int64_t>(r) * p.Nk + j] = s_logit[r][jj];
  }
  if (p.part) {
    for (int r = warp; r < p.R; r += NT / 32) {
      float m = -INFINITY;
      for (int jj = lane; jj < KC; jj += 32) m = fmaxf(m, s_logit[r][jj]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const float m_use = m == -INFINITY ? 0.f : m;  // empty chunk: sum 0, not NaN
      float s = 0.f;
      for (int jj = lane; jj < KC; jj += 32) s += exp2_approx(s_logit[r][jj] - m_use);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) p.part[(static_cast<int64_t>(bh) * p.R + r) * p.nchunks + chunk] = make_float2(m, s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Few rows: kernel 2, each row's lse from the partials (or the given lse), then the sum over rows.

struct FewRowsFinishParams {
  const float* logits;  // as FewRowsParams
  const float2* part;   // used when lse == nullptr
  const float* lse;     // [B, Hq, Nq] any strides, natural log; nullptr = from part
  int64_t lse_sb, lse_sh, lse_sn;
  const int64_t* rows;
  const float* sinks;  // [Hq] natural-log sink logits joining the computed lse, or nullptr
  float* out;          // [B, Hq, Nk]
  int R, Nq, Nk, Hq, nchunks;
};

using plan::kFinishKeys;
using plan::kFinishThreads;

// Merges the (max, sum-exp) pair (m2, s2) into (m, s), log2 domain. A sum is NaN once a logit
// was NaN (max skips NaN): that NaN survives every merge.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {  // both without a finite logit: sums 0 or NaN
    s += s2;
    return;
  }
  s = s * exp2_approx(m - mn) + s2 * exp2_approx(m2 - mn);
  m = mn;
}

__global__ void __launch_bounds__(kFinishThreads) few_rows_finish_kernel(const FewRowsFinishParams p) {
  __shared__ float s_lse2[kFewRows];  // log2-domain lse; +inf = the row contributes nothing
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t* rows = p.rows ? p.rows + static_cast<int64_t>(b) * p.R : nullptr;

  for (int r = warp; r < p.R; r += kFinishThreads / 32) {
    const int i = row_at(rows, r, p.R, p.Nq);
    float lse2 = INFINITY;
    if (i >= 0 && p.lse) {
      const float l = p.lse[b * p.lse_sb + h * p.lse_sh + i * p.lse_sn];
      if (l != -INFINITY) lse2 = l * kLog2e;
    } else if (i >= 0) {
      float m = -INFINITY, s = 0.f;
      const float2* part = p.part + (static_cast<int64_t>(bh) * p.R + r) * p.nchunks;
      for (int c = lane; c < p.nchunks; c += 32) lse_merge(m, s, part[c].x, part[c].y);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
      }
      if (p.sinks && p.sinks[h] != -INFINITY) lse_merge(m, s, p.sinks[h] * kLog2e, 1.f);  // exp2(0) = 1 at its max
      if (s != 0.f) lse2 = m + log2f(s);  // NaN stays NaN
    }
    if (lane == 0) s_lse2[r] = lse2;
  }
  __syncthreads();

  const float* logits = p.logits + static_cast<int64_t>(bh) * p.R * p.Nk;
  const int j_end = min(p.Nk, (blockIdx.y + 1) * kFinishKeys);
  for (int j = blockIdx.y * kFinishKeys + tid; j < j_end; j += kFinishThreads) {
    float acc = 0.f;
    for (int r = 0; r < p.R; ++r) {  // a hidden key (-inf) adds 0, also to a row whose lse is NaN
      const float x = logits[static_cast<int64_t>(r) * p.Nk + j];
      acc += x == -INFINITY ? 0.f : exp2_approx(x - s_lse2[r]);
    }
    p.out[static_cast<int64_t>(bh) * p.Nk + j] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Many rows: the column kernel (fp16/bf16 tensor cores).

struct ColParams {
  const void* q;
  const void* k;
  const float* lse;  // natural log, indexed [b, h, row index] (or [b, h, position] when lse_by_pos)
  int64_t lse_sb, lse_sh, lse_sn;
  bool lse_by_pos;      // lse comes from the LSE-only kernel over the gathered rows
  const int64_t* rows;  // [B, nrows] contiguous, nullptr = rows 0..Nq-1
  float* out;           // [B, Hq, Nk]
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn;
  int nrows, Nq, Nk, Hq, D, group;
  bool causal;
  float scale_log2;
  AttnOptions opt;  // softcap and window, read by the OPT instantiation (sinks are in the lse)
};

// 4 warps x 32 keys (MT = 2 blocks of 16): every Q fragment read from shared memory feeds two mmas.
using plan::kColKeys;
using plan::kColWarps;
constexpr int kColMT = 2, kColRows = 64;
static_assert(kColKeys == 16 * kColMT * kColWarps, "a CTA's keys: MT row blocks of 16 per warp");

template <typename T, int DP, bool OPT>
__global__ void __launch_bounds__(kColWarps * 32) key_colsum_kernel(const ColParams p) {
  constexpr int NT = kColWarps * 32, MT = kColMT, BK = kColKeys, BR = kColRows, STR = DP + 8, NB = BR / 8;
  static_assert(BK == 2 * BR, "the K tile is staged in the two Q stages");
  __shared__ __align__(16) T sbuf[2 * BR * STR];  // first the K tile, then the two Q stages
  __shared__ float s_lse2[2][BR];                // log2-domain lse per staged row; +inf = skip
  __shared__ int s_row[2][BR];                   // query row index per staged row (causal mask)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BK, h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const int off = p.Nk - p.Nq;  // causal: key j is visible to row i iff j <= i + off
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const int64_t* rows = p.rows ? p.rows + static_cast<int64_t>(b) * p.nrows : nullptr;

  load_tile_async<BK, DP, STR, NT>(
      sbuf, [&](int r) -> const T* { return n0 + r < p.Nk ? k + (n0 + r) * p.k_sn : nullptr; }, p.D, k, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int wkey = warp * 16 * MT;  // first key (tile row) of this warp
  uint32_t kf[MT][DP / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) load_a_frag<STR>(kf[mt][ks], sbuf, wkey + mt * 16, ks * 16, lane);
  __syncthreads();  // sbuf becomes the Q ring

  // Contiguous causal rows before the first one that sees key n0 contribute nothing here, nor do
  // rows whose window starts after the CTA's last key.
  const int first = (p.causal && !rows) ? max(0, n0 - off) / BR : 0;
  const int all_tiles = (p.nrows + BR - 1) / BR;
  const int n_tiles = OPT && p.opt.window >= 0 && !rows
                          ? min(all_tiles, max(0, n0 + BK - 1 - off + p.opt.window) / BR + 1)
                          : all_tiles;
  auto stage = [&](int tile, int buf) {
    const int r0 = tile * BR;
    if (tid < BR) {
      const int pos = r0 + tid, i = row_at(rows, pos, p.nrows, p.Nq);
      float lse2 = INFINITY;
      if (i >= 0) {
        const float l = p.lse[b * p.lse_sb + h * p.lse_sh + (p.lse_by_pos ? pos : i) * p.lse_sn];
        if (l != -INFINITY) lse2 = l * kLog2e;  // a row without visible keys contributes nothing
      }
      s_row[buf][tid] = i;
      s_lse2[buf][tid] = lse2;
    }
    load_tile_async<BR, DP, STR, NT>(
        sbuf + buf * BR * STR,
        [&](int r) -> const T* {
          const int i = row_at(rows, r0 + r, p.nrows, p.Nq);
          return i < 0 ? nullptr : q + i * p.q_sn;
        },
        p.D, q, tid);
  };

  float colsum[MT][2] = {};
  if (first < n_tiles) stage(first, 0);
  cp_async_commit();
  for (int t = first; t < n_tiles; ++t) {
    const int buf = (t - first) & 1;
    if (t + 1 < n_tiles) stage(t + 1, buf ^ 1);  // stage buf^1 was released by the last barrier
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[MT][NB][4] = {};  // S^T: rows = keys, columns = staged query rows
    gemm_a_bt<MT, NB, DP, STR>(
        s, [&](int mt, int ks, uint32_t (&a)[4]) {
#pragma unroll
          for (int x = 0; x < 4; ++x) a[x] = kf[mt][ks][x];
        },
        sbuf + buf * BR * STR, lane);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = nb * 8 + (lane & 3) * 2 + e;
        const float lse2 = s_lse2[buf][c];
        const int i = s_row[buf][c];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int j = n0 + wkey + mt * 16 + (lane >> 2) + hr * 8;
            if constexpr (OPT) {
              const float x = p.opt.cap_out > 0.f
                                  ? p.opt.cap_out * tanh_from_2u_log2e(s[mt][nb][2 * hr + e] * p.opt.cap_in)
                                  : s[mt][nb][2 * hr + e] * p.scale_log2;
              const bool hidden = (p.causal && j > i + off) || (p.opt.window >= 0 && j < i + off - p.opt.window);
              colsum[mt][hr] += hidden ? 0.f : exp2_approx(x - lse2);
            } else {
              const float pr = exp2_approx(s[mt][nb][2 * hr + e] * p.scale_log2 - lse2);
              colsum[mt][hr] += (p.causal && j > i + off) ? 0.f : pr;
            }
          }
        }
      }
    }
    __syncthreads();  // stage `buf` is refilled by the next iteration
  }

  float* out = p.out + (static_cast<int64_t>(b) * p.Hq + h) * p.Nk;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float v = quad_sum(colsum[mt][hr]);
      const int j = n0 + wkey + mt * 16 + (lane >> 2) + hr * 8;
      if ((lane & 3) == 0 && j < p.Nk) out[j] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host.

// The few-rows kernel for T's key rows of p.D elements, launched as `l` (plan::key_importance); a
// plan whose key chunks are not the kernel's is refused as an invalid configuration.
template <typename T>
cudaError_t launch_few_rows(const FewRowsParams& p, const plan::Launch& l, cudaStream_t stream) {
  auto go = [&](auto kernel, int keys_per_chunk) {
    if (l.grid[1] != (p.Nk + keys_per_chunk - 1) / keys_per_chunk) return cudaErrorInvalidConfiguration;
    return plan::launch(l, kernel, stream, p);
  };
  const int cpk = p.D / (16 / static_cast<int>(sizeof(T)));  // 16-byte chunks per key row
  if (cpk <= 8) return go(few_rows_logits_kernel<T, 8>, few_chunk_keys<8>());
  if (cpk <= 16) return go(few_rows_logits_kernel<T, 16>, few_chunk_keys<16>());
  if constexpr (sizeof(T) == 4) return go(few_rows_logits_kernel<T, 32>, few_chunk_keys<32>());  // fp32, D > 64
  return cudaErrorInvalidConfiguration;
}

at::Tensor key_importance_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const std::optional<at::Tensor>& lse,
                               const std::optional<at::Tensor>& rows_in, bool causal, double scale, double softcap,
                               int64_t window, const std::optional<at::Tensor>& sinks) {
  host::check_q_k(q_in, k_in, "key_importance");
  host::check_options(q_in, softcap, window, sinks, "key_importance");
  const at::ScalarType dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "key_importance: q dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  if (lse) {
    TORCH_CHECK(lse->device() == q_in.device(), "key_importance: lse must be on q's device ", q_in.device(),
                ", got ", lse->device());
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "key_importance: lse must be float32, got ", lse->scalar_type());
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == Hq && lse->size(2) == Nq,
                "key_importance: lse must be [B, Hq, Nq] = [", B, ", ", Hq, ", ", Nq, "], got ", lse->sizes());
  }
  if (rows_in) {
    TORCH_CHECK(rows_in->device() == q_in.device(), "key_importance: rows must be on q's device ", q_in.device(),
                ", got ", rows_in->device());
    TORCH_CHECK(rows_in->scalar_type() == at::kLong, "key_importance: rows must be int64, got ",
                rows_in->scalar_type());
    TORCH_CHECK(rows_in->dim() == 2 && rows_in->size(0) == B, "key_importance: rows must be [B, R] with B = ", B,
                ", got ", rows_in->sizes());
    TORCH_CHECK(rows_in->size(1) < std::numeric_limits<int>::max(), "key_importance: too many rows");
  }

  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({B, Hq, Nk}, q_in.options().dtype(at::kFloat));
  const int64_t R = rows_in ? rows_in->size(1) : Nq;
  const plan::Plan lp = plan::key_importance(plan::device_limits(*at::cuda::getCurrentDeviceProperties()), B, Hq, Nk,
                                             R, D, q_in.element_size(), lse.has_value());
  TORCH_CHECK(lp.ok(), "key_importance: ", lp.error);
  if (out.numel() == 0) return out;
  if (R == 0 || Nq == 0) return out.zero_();  // no rows (Nq == 0 leaves only skipped entries)

  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor rows = rows_in ? rows_in->contiguous() : at::Tensor();
  const int64_t* rows_ptr = rows_in ? rows.data_ptr<int64_t>() : nullptr;
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const AttnOptions opt = AttnOptions::make(scale, softcap, window, sinks ? sinks->data_ptr<float>() : nullptr, Nk);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (R <= kFewRows) {  // lp: the logits kernel, then the finishing one
    const int64_t nchunks = lp.launch[0].grid[1];
    at::Tensor logits = at::empty({B * Hq, R, Nk}, out.options());
    at::Tensor part = lse ? at::Tensor() : at::empty({B * Hq, R, nchunks, 2}, out.options());
    FewRowsParams p{};
    p.q = q.data_ptr(), p.k = k.data_ptr(), p.rows = rows_ptr;
    p.logits = logits.data_ptr<float>();
    p.part = lse ? nullptr : reinterpret_cast<float2*>(part.data_ptr<float>());
    p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sn = q.stride(2);
    p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
    p.R = static_cast<int>(R), p.Nq = static_cast<int>(Nq), p.Nk = static_cast<int>(Nk);
    p.Hq = static_cast<int>(Hq), p.D = static_cast<int>(D), p.group = static_cast<int>(Hq / Hkv);
    p.nchunks = static_cast<int>(nchunks), p.causal = causal, p.scale_log2 = scale_log2;
    p.cap_in = softcap > 0 ? static_cast<float>(2.0 / softcap) : 0.f;  // dot is already in the log2 domain
    p.cap_out = softcap > 0 ? static_cast<float>(softcap * kLog2e) : 0.f;
    p.window = opt.window;
    if (dtype == at::kHalf) C10_CUDA_CHECK(launch_few_rows<__half>(p, lp.launch[0], stream));
    else if (dtype == at::kBFloat16) C10_CUDA_CHECK(launch_few_rows<__nv_bfloat16>(p, lp.launch[0], stream));
    else C10_CUDA_CHECK(launch_few_rows<float>(p, lp.launch[0], stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    FewRowsFinishParams f{};
    f.logits = p.logits, f.part = p.part, f.rows = rows_ptr, f.sinks = opt.sinks, f.out = out.data_ptr<float>();
    if (lse) {
      f.lse = lse->data_ptr<float>();
      f.lse_sb = lse->stride(0), f.lse_sh = lse->stride(1), f.lse_sn = lse->stride(2);
    }
    f.R = p.R, f.Nq = p.Nq, f.Nk = p.Nk, f.Hq = p.Hq, f.nchunks = p.nchunks;
    C10_CUDA_CHECK(plan::launch(lp.launch[1], few_rows_finish_kernel, stream, f));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  // lp: the flash kernel's LSE of the rows (without a given lse), then the column kernel; the plan
  // refused float32 here (more rows run fp16/bf16 on tensor cores; fp32 goes to Triton).
  const plan::Launch& col = lp.launch[lp.n - 1];
  ColParams c{};
  c.q = q.data_ptr(), c.k = k.data_ptr(), c.rows = rows_ptr, c.out = out.data_ptr<float>();
  c.q_sb = q.stride(0), c.q_sh = q.stride(1), c.q_sn = q.stride(2);
  c.k_sb = k.stride(0), c.k_sh = k.stride(1), c.k_sn = k.stride(2);
  c.nrows = static_cast<int>(R), c.Nq = static_cast<int>(Nq), c.Nk = static_cast<int>(Nk);
  c.Hq = static_cast<int>(Hq), c.D = static_cast<int>(D), c.group = static_cast<int>(Hq / Hkv);
  c.causal = causal, c.scale_log2 = scale_log2, c.opt = opt;

  at::Tensor row_lse;  // keeps the LSE-only kernel's output alive until the column kernel is queued
  if (lse) {
    c.lse = lse->data_ptr<float>();
    c.lse_sb = lse->stride(0), c.lse_sh = lse->stride(1), c.lse_sn = lse->stride(2);
    c.lse_by_pos = false;
  } else {
    row_lse = at::empty({B, Hq, R}, out.options());
    FlashParams f{};
    f.q = q.data_ptr(), f.k = k.data_ptr(), f.v = nullptr, f.out = nullptr;
    f.lse = row_lse.data_ptr<float>(), f.rows = rows_ptr;
    f.q_sb = c.q_sb, f.q_sh = c.q_sh, f.q_sn = c.q_sn, f.k_sb = c.k_sb, f.k_sh = c.k_sh, f.k_sn = c.k_sn;
    f.nrows = c.nrows, f.Nq = c.Nq, f.Nk = c.Nk, f.Hq = c.Hq, f.D = c.D, f.group = c.group;
    f.causal = causal, f.scale_log2 = scale_log2, f.opt = opt;
    dispatch_half_dp(dtype == at::kBFloat16, D, [&](auto tag, auto dp) {
      C10_CUDA_CHECK((launch_flash_fwd<decltype(tag), decltype(dp)::value, true>(f, lp.launch[0], stream)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    c.lse = f.lse;
    c.lse_sb = row_lse.stride(0), c.lse_sh = row_lse.stride(1), c.lse_sn = row_lse.stride(2);
    c.lse_by_pos = true;
  }
  dispatch_half_dp(dtype == at::kBFloat16, D, [&](auto tag, auto dp) {
    // Sinks live in the lse: the plain kernel runs them.
    if (opt.cap_out > 0.f || opt.window >= 0)
      C10_CUDA_CHECK(plan::launch(col, key_colsum_kernel<decltype(tag), decltype(dp)::value, true>, stream, c));
    else
      C10_CUDA_CHECK(plan::launch(col, key_colsum_kernel<decltype(tag), decltype(dp)::value, false>, stream, c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("key_importance", &vtattn::key_importance_cuda); }
