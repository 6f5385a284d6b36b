// Torch-free FlashAttention-2 style forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
// fp32 accumulate), shared by attention.cu (out + lse), key_importance.cu (lse only, over
// gathered rows), varlen_attention.cu, index_attention.cu and block_sparse_attention.cu.
//
// One CTA owns BM query rows of one (problem, query head); each warp owns 16 * MT of them. K/V
// tiles of BN keys stream through a two-stage cp.async ring.
// Softmax runs in the log2 domain (logits pre-multiplied by scale * log2(e)).
//
// What differs between the ops — where query rows, keys and outputs live, and which keys a row
// sees — is a Tile policy (DenseTile and BlockSparseTile below; VarlenTile, IndexTile in their .cu
// files), built per
// CTA by the kernel:
//   Tile(const Params&, int m0, int BM, int h, int b, void* extra)   extra: kExtraSmem bytes
//   bool empty() const                    nothing to do (the CTA returns before any barrier)
//   int n_keys, key_end                   key slots 0..n_keys-1; slots >= key_end are invisible
//                                         to every row of the CTA (causal tile skipping)
//   int key_begin                         (kOptions only) slots < key_begin are invisible to every
//                                         row (window tile skipping)
//   const T* q_row(r), k_row(j), v_row(j) global rows (D elements) or nullptr for zeros; k/v_row
//                                         are only asked for j < n_keys
//   void stage_keys<BN, NT>(n0, buf, tid) per key tile, before the barrier that publishes it
//   RowKey row_key(r)                     what visible() needs about tile row r
//   bool needs_causal(n0, BN) const       whether visible() may hide an element of the key tile
//   bool visible(rk, j, slot) const       key j (slot = buf * BN + j - n0) visible to the row
//   float* lse_at(r), T* out_at(r)        where tile row r's results go, or nullptr
// Every Params has the element pointers q, k, v (v unused when LSE_ONLY), the head dim D and
// scale_log2 = scale * log2(e). A Tile that declares `static constexpr bool kOptions = true` also
// runs the options of the attention family (softcap, left window, sinks; Params::opt): a
// compile-time switch, so the instantiations without them are the plain kernel.
#pragma once

#include <cuda_runtime.h>

#include "launch_plan.h"
#include "tile_mma.cuh"

namespace vtattn {

// Softcap, sliding (left) window and attention sinks (docs/internals.md), as the kernels use them.
struct AttnOptions {
  float cap_in = 0.f;   // softcap c > 0: log2-domain logit of q.k = cap_out * tanh_from_2u_log2e(q.k * cap_in)
  float cap_out = 0.f;  // (cap_in = 2 log2(e) scale / c, cap_out = c log2(e)); 0 = off
  int window = -1;      // >= 0: keys j < i + Nk - Nq - window are hidden from row i; -1 = none
  const float* sinks = nullptr;  // [Hq] fp32 natural-log logits joining each row's denominator

  // `max_keys` bounds every sequence's key count: a window that reaches past it hides nothing.
  static AttnOptions make(double scale, double softcap, long long window, const float* sinks, long long max_keys) {
    AttnOptions o;
    if (softcap > 0) {
      o.cap_in = static_cast<float>(2.0 * 1.4426950408889634 * scale / softcap);
      o.cap_out = static_cast<float>(softcap * 1.4426950408889634);
    }
    o.window = window >= 0 && window < max_keys ? static_cast<int>(window) : -1;
    o.sinks = sinks;
    return o;
  }
  bool any() const { return cap_out > 0.f || window >= 0 || sinks != nullptr; }
};

// tanh(u) given y = 2 log2(e) u, from one exp2: (1 - e) / (1 + e) with e = 2^-|y|, sign
// restored. Absolute error ~1e-7 (ex2.approx), plenty for fp16/bf16; NaN propagates, +-inf -> +-1.
__device__ __forceinline__ float tanh_from_2u_log2e(float y) {
  const float e = exp2_approx(-fabsf(y));
  return copysignf(__fdividef(1.f - e, 1.f + e), y);
}

template <typename Tile, typename = void> struct TileOptions : std::false_type {};
template <typename Tile>
struct TileOptions<Tile, std::void_t<decltype(Tile::kOptions)>> : std::bool_constant<Tile::kOptions> {};

// DP = head dim padded to a multiple of 16. Each warp owns MT = BM / (16 * WARPS) blocks of 16
// rows. DP 64/80: MT = 2 with Q fragments held in registers (each K/V fragment read from shared
// memory feeds two mmas; ~255 registers, 2 CTAs per SM). DP 128: the fp32 output alone takes 64
// registers per row block, so MT = 1, 8 warps, and Q fragments are re-read from shared memory
// each k step to stay within 128 registers (2 CTAs of 8 warps per SM).
// Tile sizes, threads and shared memory are those of the launch plan (csrc/include/launch_plan.h:
// plan::flash), which the launchers launch with and check_launches checks. At DP 128 the shared
// memory is 104448 bytes, above the 99 KiB opt-in of sm_86 / sm_89: the plan refuses those devices
// (python/vtattn/_cuda_caps.py mirrors it to send the inputs to Triton instead).
template <int DP> struct FlashCfg {
  static_assert(DP == 64 || DP == 80 || DP == 128, "instantiated head dims");
  static constexpr int BM = plan::kFlashBM, BN = plan::kFlashBN, WARPS = plan::flash_threads(DP) / 32, MIN_CTAS = 2;
  static constexpr bool Q_IN_REGS = DP != 128;
};

template <typename T, int DP, bool LSE_ONLY, typename Tile>
__global__ void __launch_bounds__(FlashCfg<DP>::WARPS * 32, FlashCfg<DP>::MIN_CTAS)
    flash_fwd_kernel(const typename Tile::Params p) {
  constexpr int BM = FlashCfg<DP>::BM, BN = FlashCfg<DP>::BN, NW = FlashCfg<DP>::WARPS;
  constexpr bool OPT = TileOptions<Tile>::value;
  constexpr bool QREG = FlashCfg<DP>::Q_IN_REGS || LSE_ONLY;  // no output accumulators: room for Q
  constexpr int NT = NW * 32, MT = BM / (16 * NW), STR = DP + 8, NB = BN / 8, DB = DP / 8;
  static_assert(BM == 16 * MT * NW, "warps tile the query rows");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][STR]; later the output staging area
  T* sK = sQ + BM * STR;                   // [2][BN][STR]
  T* sV = sK + 2 * BN * STR;               // [2][BN][STR], only without LSE_ONLY
  void* extra = sK + (LSE_ONLY ? 2 : 4) * BN * STR;  // Tile::kExtraSmem bytes

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest causal tiles start first
  Tile tile(p, m0, BM, blockIdx.y, blockIdx.z, extra);
  if (tile.empty()) return;  // uniform over the CTA, before any barrier
  const int n_tiles = (tile.key_end + BN - 1) / BN;
  int t0 = 0;  // first key tile: those wholly left of every row's window are skipped
  if constexpr (OPT) t0 = tile.key_begin / BN;
  const T* fallback = static_cast<const T*>(p.q);

  load_tile_async<BM, DP, STR, NT>(sQ, [&](int r) { return tile.q_row(r); }, p.D, fallback, tid);
  cp_async_commit();
  auto load_kv = [&](int t, int buf) {
    const int n0 = t * BN;
    load_tile_async<BN, DP, STR, NT>(
        sK + buf * BN * STR, [&](int r) -> const T* { return n0 + r < tile.n_keys ? tile.k_row(n0 + r) : nullptr; },
        p.D, fallback, tid);
    if constexpr (!LSE_ONLY)
      load_tile_async<BN, DP, STR, NT>(
          sV + buf * BN * STR, [&](int r) -> const T* { return n0 + r < tile.n_keys ? tile.v_row(n0 + r) : nullptr; },
          p.D, fallback, tid);
    tile.template stage_keys<BN, NT>(n0, buf, tid);
  };
  if (t0 < n_tiles) load_kv(t0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int wrow = warp * 16 * MT;  // first tile row of this warp
  uint32_t qf[MT][QREG ? DP / 16 : 1][4];
  if constexpr (QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks) load_a_frag<STR>(qf[mt][ks], sQ, wrow + mt * 16, ks * 16, lane);
  }
  auto q_frag = [&](int mt, int ks, uint32_t (&a)[4]) {
    if constexpr (QREG) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = qf[mt][ks][i];
    } else {
      load_a_frag<STR>(a, sQ, wrow + mt * 16, ks * 16, lane);
    }
  };

  // This thread's C-fragment rows: g and g + 8 of each row block.
  typename Tile::RowKey row_k[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) row_k[mt][hr] = tile.row_key(wrow + mt * 16 + (lane >> 2) + hr * 8);

  float acc_o[MT][LSE_ONLY ? 1 : DB][4] = {};
  float m_run[MT][2], l_run[MT][2];  // running max (log2 domain) and this thread's partial sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) m_run[mt][hr] = -INFINITY, l_run[mt][hr] = 0.f;

  for (int t = t0; t < n_tiles; ++t) {
    const int buf = (t - t0) & 1;
    // Prefetch tile t+1 into the other stage; the barrier that ended iteration t-1 guarantees
    // every warp is done reading it. An empty group keeps the wait count uniform.
    if (t + 1 < n_tiles) load_kv(t + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[MT][NB][4] = {};
    gemm_a_bt<MT, NB, DP, STR>(s, q_frag, sK + buf * BN * STR, lane);

    const int n0 = t * BN;
    const bool causal_tile = tile.needs_causal(n0, BN);
    const bool need_mask = n0 + BN > tile.n_keys || causal_tile;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s[mt][nb][2 * hr + e] * p.scale_log2;
            if constexpr (OPT)  // softcap on the scaled logits, before masking
              if (p.opt.cap_out > 0.f) x = p.opt.cap_out * tanh_from_2u_log2e(s[mt][nb][2 * hr + e] * p.opt.cap_in);
            if (need_mask) {
              const int jl = nb * 8 + (lane & 3) * 2 + e, j = n0 + jl;
              if (j >= tile.n_keys || (causal_tile && !tile.visible(row_k[mt][hr], j, buf * BN + jl))) x = -INFINITY;
            }
            s[mt][nb][2 * hr + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        const float m_new = fmaxf(m_run[mt][hr], quad_max(mx));
        // A row with nothing visible yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2_approx(m_run[mt][hr] - m_use);
        m_run[mt][hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = exp2_approx(s[mt][nb][2 * hr + e] - m_use);
            s[mt][nb][2 * hr + e] = pe;
            sum += pe;
          }
        }
        l_run[mt][hr] = l_run[mt][hr] * alpha + sum;
        if constexpr (!LSE_ONLY) {
#pragma unroll
          for (int db = 0; db < DB; ++db) acc_o[mt][db][2 * hr] *= alpha, acc_o[mt][db][2 * hr + 1] *= alpha;
        }
      }
    }
    if constexpr (!LSE_ONLY) gemm_p_v<MT, BN, DP, STR>(acc_o, s, sV + buf * BN * STR, lane);
    __syncthreads();  // stage `buf` is refilled by the next iteration's prefetch
  }

  // l is 0 for a row without visible keys (out 0, lse -inf), NaN once a logit was NaN.
  float sink2 = -INFINITY;  // the sink logit (log2 domain) joins every row's denominator
  if constexpr (OPT)
    if (p.opt.sinks) sink2 = p.opt.sinks[blockIdx.y] * kLog2e;  // grid y: the query head
  float inv_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = quad_sum(l_run[mt][hr]), m = m_run[mt][hr];
      if constexpr (OPT) {
        // total = l 2^m + 2^sink2, kept as (top, l) relative to top = max(m, sink2).
        const float top = fmaxf(m, sink2), top_use = top == -INFINITY ? 0.f : top;
        const float scaled = exp2_approx(m - top_use);  // 0 without visible keys
        l = l * scaled + exp2_approx(sink2 - top_use);
        inv_l[mt][hr] = l == 0.f ? 0.f : scaled / l;
        m = top_use;
      } else {
        inv_l[mt][hr] = l == 0.f ? 0.f : 1.f / l;
      }
      float* lse = tile.lse_at(wrow + mt * 16 + (lane >> 2) + hr * 8);
      if ((lane & 3) == 0 && lse) *lse = l == 0.f ? -INFINITY : (m + log2f(l)) * kLn2;
    }
  }

  if constexpr (!LSE_ONLY) {
    // Stage the warp's output rows in its own rows of sQ (only this warp ever read them), then
    // write whole 16-byte chunks of the real D columns.
    __syncwarp();  // the warp's ldmatrix reads of these rows are done (no barrier when n_tiles == 0)
    T* sO = sQ + wrow * STR;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int db = 0; db < DB; ++db) {
        const int r = mt * 16 + (lane >> 2), c = db * 8 + (lane & 3) * 2;
        *reinterpret_cast<uint32_t*>(sO + r * STR + c) =
            pack2<T>(acc_o[mt][db][0] * inv_l[mt][0], acc_o[mt][db][1] * inv_l[mt][0]);
        *reinterpret_cast<uint32_t*>(sO + (r + 8) * STR + c) =
            pack2<T>(acc_o[mt][db][2] * inv_l[mt][1], acc_o[mt][db][3] * inv_l[mt][1]);
      }
    }
    __syncwarp();
    constexpr int CPR = DP / 8;
    for (int idx = lane; idx < 16 * MT * CPR; idx += 32) {
      const int r = idx / CPR, c = idx % CPR;
      T* out = tile.out_at(wrow + r);
      if (out && c * 8 < p.D)
        *reinterpret_cast<uint4*>(out + c * 8) = *reinterpret_cast<const uint4*>(sO + r * STR + c * 8);
    }
  }
}

template <typename T, int DP, bool LSE_ONLY, typename Tile>
constexpr size_t flash_smem_bytes() {
  return static_cast<size_t>(FlashCfg<DP>::BM + (LSE_ONLY ? 2 : 4) * FlashCfg<DP>::BN) * (DP + 8) * sizeof(T) +
         Tile::kExtraSmem;
}

// Launches the kernel as plan::flash planned it (grid x: query tiles of BM rows, y: query heads,
// z: problems) on `stream`; the caller checks the launch error. A plan whose threads or shared
// memory are not this instantiation's (the launcher planned another head dim, dtype or Tile) is
// refused as an invalid configuration rather than launched.
template <typename T, int DP, bool LSE_ONLY, typename Tile>
cudaError_t launch_flash(const typename Tile::Params& p, const plan::Launch& l, cudaStream_t stream) {
  constexpr size_t smem = flash_smem_bytes<T, DP, LSE_ONLY, Tile>();
  static_assert(smem == plan::flash_smem(DP, sizeof(T), LSE_ONLY, Tile::kExtraSmem), "the plan's layout");
  if (l.dyn_smem != static_cast<int64_t>(smem) || l.block != FlashCfg<DP>::WARPS * 32)
    return cudaErrorInvalidConfiguration;
  return plan::launch(l, flash_fwd_kernel<T, DP, LSE_ONLY, Tile>, stream, p);
}

// ---- dense [B, H, N, D] rows: attention, and key_importance's gathered rows ----

struct FlashParams {
  const void* q;
  const void* k;
  const void* v;        // unused when LSE_ONLY
  void* out;            // [B, Hq, Nq, D] stored token-major ([B, Nq, Hq, D] memory); unused when LSE_ONLY
  float* lse;           // [B, Hq, nrows] contiguous, natural log
  const int64_t* rows;  // [B, nrows] contiguous query-row indices (out of range = none);
                        // nullptr = rows 0 .. nrows-1 (then nrows == Nq)
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;  // element strides
  int nrows, Nq, Nk, Hq, D, group;                                // group = Hq / Hkv
  bool causal;
  float scale_log2;  // scale * log2(e)
  AttnOptions opt;   // read only by DenseTile<T, true>
};

template <typename T, bool OPT = false> struct DenseTile {
  using Params = FlashParams;
  using RowKey = int;  // the row's horizon i + Nk - Nq: keys j <= it are visible under causal
  static constexpr size_t kExtraSmem = 0;
  static constexpr bool kOptions = OPT;

  const T *q, *k, *v;
  const int64_t* rows;
  float* lse;
  T* out;
  int64_t q_sn, k_sn, v_sn, out_sn;
  int m0, nrows, Nq, off, n_keys, key_end;  // off: key j is visible to row i iff j <= i + off
  int key_begin = 0, window = -1, lo_last = 0;  // OPT: the window, the left bound of the last row
  bool causal;

  __device__ __forceinline__ DenseTile(const Params& p, int m0_, int BM, int h, int b, void*)
      : q(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh),
        k(static_cast<const T*>(p.k) + b * p.k_sb + (h / p.group) * p.k_sh),
        v(p.v ? static_cast<const T*>(p.v) + b * p.v_sb + (h / p.group) * p.v_sh : nullptr),
        rows(p.rows ? p.rows + static_cast<int64_t>(b) * p.nrows : nullptr),
        lse(p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.nrows),
        out(p.out ? static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.Nq * p.Hq + h) * p.D : nullptr),
        q_sn(p.q_sn), k_sn(p.k_sn), v_sn(p.v_sn), out_sn(static_cast<int64_t>(p.Hq) * p.D),
        m0(m0_), nrows(p.nrows), Nq(p.Nq), off(p.Nk - p.Nq), n_keys(p.Nk), key_end(p.Nk), causal(p.causal) {
    // With contiguous causal rows, keys past the last row's horizon are invisible to the whole tile.
    if (causal && !rows) key_end = max(0, min(n_keys, m0 + BM + off));
    if constexpr (OPT) {
      window = p.opt.window;
      lo_last = m0 + BM - 1 + off - window;
      // With contiguous rows, keys before the first row's window are invisible to the whole tile.
      if (window >= 0 && !rows) key_begin = max(0, m0 + off - window);
    }
  }
  __device__ __forceinline__ bool empty() const { return false; }
  // Query row read by tile row r, or -1 (past the end, or a skipped / out-of-range index).
  __device__ __forceinline__ int row_index(int r) const {
    const int pos = m0 + r;
    if (pos >= nrows) return -1;
    if (!rows) return pos;
    const int64_t i = rows[pos];
    return (i >= 0 && i < Nq) ? static_cast<int>(i) : -1;
  }
  __device__ __forceinline__ const T* q_row(int r) const {
    const int i = row_index(r);
    return i < 0 ? nullptr : q + i * q_sn;
  }
  __device__ __forceinline__ const T* k_row(int j) const { return k + j * k_sn; }
  __device__ __forceinline__ const T* v_row(int j) const { return v + j * v_sn; }
  template <int BN, int NT> __device__ __forceinline__ void stage_keys(int, int, int) {}
  __device__ __forceinline__ RowKey row_key(int r) const { return row_index(r) + off; }
  __device__ __forceinline__ bool needs_causal(int n0, int BN) const {
    if constexpr (OPT)
      if (window >= 0 && (rows != nullptr || n0 < lo_last)) return true;
    return causal && (rows != nullptr || n0 + BN - 1 > m0 + off);
  }
  __device__ __forceinline__ bool visible(RowKey horizon, int j, int) const {
    if constexpr (OPT) return (!causal || j <= horizon) && (window < 0 || j >= horizon - window);
    return j <= horizon;
  }
  __device__ __forceinline__ float* lse_at(int r) const { return m0 + r < nrows ? lse + m0 + r : nullptr; }
  __device__ __forceinline__ T* out_at(int r) const { return m0 + r < Nq ? out + (m0 + r) * out_sn : nullptr; }
};

// Dense launch as plan::flash(nrows, Hq, B, ...) planned it; the option-aware kernel only when an
// option is on.
template <typename T, int DP, bool LSE_ONLY>
cudaError_t launch_flash_fwd(const FlashParams& p, const plan::Launch& l, cudaStream_t stream) {
  return p.opt.any() ? launch_flash<T, DP, LSE_ONLY, DenseTile<T, true>>(p, l, stream)
                     : launch_flash<T, DP, LSE_ONLY, DenseTile<T, false>>(p, l, stream);
}

// ---- block_sparse_attention: query block m sees the key blocks its list names ----

struct BlockSparseParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;         // [B, Hq, Nq, D] stored token-major ([B, Nq, Hq, D] memory)
  float* lse;        // [B, Hq, Nq] contiguous, natural log
  const int* num;    // kv_num_blocks [Bm, Hm, Q_blocks], row stride 1
  const int* idx;    // kv_indices [Bm, Hm, Q_blocks, K_blocks], last stride 1
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;  // element strides
  int64_t num_sb, num_sh, idx_sb, idx_sh, idx_sm;                // list strides; 0 = shared by batch / heads
  int Nq, Nk, Hq, D, group, block_size, k_blocks;                // block_size: a multiple of the CTA's rows
  bool causal;
  float scale_log2;
};

// Key slot j is key (j % block_size) of the (j / block_size)-th listed block, so a CTA (its BM rows in
// one query block) streams only listed blocks, each whole key tile inside one block (block_size is a
// multiple of BM, itself a multiple of BN). Lists are trusted like the Triton kernel's: the count is
// clamped to [0, K_blocks] and a block outside [0, K_blocks) reads zeros and is hidden, so a bad list
// gives wrong numbers, never an out-of-bounds read. Tiles of a ragged last block, across the causal
// diagonal or of a bad block take the mask; listed blocks wholly above the diagonal are masked whole.
template <typename T> struct BlockSparseTile {
  using Params = BlockSparseParams;
  using RowKey = int;  // the row's horizon i + Nk - Nq
  static constexpr size_t kExtraSmem = 0;
  static constexpr int kHidden = 0x7fffffff - 1024;  // key position of a bad block's slots: past every key

  const T *q, *k, *v;
  const int* list;  // the CTA's query block's listed key blocks
  float* lse;
  T* out;
  int64_t q_sn, k_sn, v_sn, out_sn;
  int m0, Nq, Nk, off, n_keys, key_end, bs, k_blocks;
  int base0, base1;  // key position of each pipeline stage's first slot (stage_keys)
  bool causal;

  __device__ __forceinline__ BlockSparseTile(const Params& p, int m0_, int, int h, int b, void*)
      : q(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh),
        k(static_cast<const T*>(p.k) + b * p.k_sb + (h / p.group) * p.k_sh),
        v(static_cast<const T*>(p.v) + b * p.v_sb + (h / p.group) * p.v_sh),
        list(p.idx + b * p.idx_sb + h * p.idx_sh + (m0_ / p.block_size) * p.idx_sm),
        lse(p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Nq),
        out(static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.Nq * p.Hq + h) * p.D),
        q_sn(p.q_sn), k_sn(p.k_sn), v_sn(p.v_sn), out_sn(static_cast<int64_t>(p.Hq) * p.D),
        m0(m0_), Nq(p.Nq), Nk(p.Nk), off(p.Nk - p.Nq), bs(p.block_size), k_blocks(p.k_blocks), causal(p.causal) {
    const int count = p.num[b * p.num_sb + h * p.num_sh + m0_ / p.block_size];
    n_keys = key_end = min(max(count, 0), p.k_blocks) * p.block_size;
    base0 = base1 = kHidden;
  }
  __device__ __forceinline__ bool empty() const { return false; }
  // Key position of slot j (< n_keys), or kHidden for a block outside the keys.
  __device__ __forceinline__ int key_pos(int j) const {
    const int blk = list[j / bs];
    return blk >= 0 && blk < k_blocks ? blk * bs + j % bs : kHidden;
  }
  __device__ __forceinline__ const T* q_row(int r) const { return m0 + r < Nq ? q + (m0 + r) * q_sn : nullptr; }
  __device__ __forceinline__ const T* k_row(int j) const {
    const int pos = key_pos(j);
    return pos < Nk ? k + pos * k_sn : nullptr;
  }
  __device__ __forceinline__ const T* v_row(int j) const {
    const int pos = key_pos(j);
    return pos < Nk ? v + pos * v_sn : nullptr;
  }
  template <int BN, int NT> __device__ __forceinline__ void stage_keys(int n0, int buf, int) {
    (buf ? base1 : base0) = key_pos(n0);  // the tile lies in one block: slot n0 + i is key base + i
  }
  __device__ __forceinline__ RowKey row_key(int r) const { return m0 + r + off; }
  __device__ __forceinline__ bool needs_causal(int n0, int BN) const {
    const int pos = key_pos(n0);
    return pos + BN > Nk || (causal && pos + BN - 1 > m0 + off);
  }
  __device__ __forceinline__ bool visible(RowKey horizon, int, int slot) const {
    constexpr int BN = plan::kFlashBN;
    const int pos = (slot >= BN ? base1 : base0) + slot % BN;
    return pos < Nk && (!causal || pos <= horizon);
  }
  __device__ __forceinline__ float* lse_at(int r) const { return m0 + r < Nq ? lse + m0 + r : nullptr; }
  __device__ __forceinline__ T* out_at(int r) const { return m0 + r < Nq ? out + (m0 + r) * out_sn : nullptr; }
};

}  // namespace vtattn
