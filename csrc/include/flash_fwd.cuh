// Torch-free FlashAttention-2 style forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
// fp32 accumulate), shared by attention.cu (out + lse) and key_importance.cu (lse only, over
// gathered rows).
//
// One CTA owns BM query rows of one (batch, query head); each warp owns 16 * MT of them. K/V tiles
// of BN keys stream through a two-stage cp.async ring.
// Softmax runs in the log2 domain (logits pre-multiplied by scale * log2(e)).
#pragma once

#include <cuda_runtime.h>

#include "tile_mma.cuh"

namespace vtattn {

// DP = head dim padded to a multiple of 16. Each warp owns MT = BM / (16 * WARPS) blocks of 16
// rows. DP 64/80: MT = 2 with Q fragments held in registers (each K/V fragment read from shared
// memory feeds two mmas; ~255 registers, 2 CTAs per SM). DP 128: the fp32 output alone takes 64
// registers per row block, so MT = 1, 8 warps, and Q fragments are re-read from shared memory
// each k step to stay within 128 registers (2 CTAs of 8 warps per SM).
template <int DP> struct FlashCfg {
  static_assert(DP == 64 || DP == 80 || DP == 128, "instantiated head dims");
  static constexpr int BM = 128, BN = 64, WARPS = DP == 128 ? 8 : 4, MIN_CTAS = 2;
  static constexpr bool Q_IN_REGS = DP != 128;
};

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
};

template <typename T, int DP, bool LSE_ONLY>
__global__ void __launch_bounds__(FlashCfg<DP>::WARPS * 32, FlashCfg<DP>::MIN_CTAS)
    flash_fwd_kernel(const FlashParams p) {
  constexpr int BM = FlashCfg<DP>::BM, BN = FlashCfg<DP>::BN, NW = FlashCfg<DP>::WARPS;
  constexpr bool QREG = FlashCfg<DP>::Q_IN_REGS || LSE_ONLY;  // no output accumulators: room for Q
  constexpr int NT = NW * 32, MT = BM / (16 * NW), STR = DP + 8, NB = BN / 8, DB = DP / 8;
  static_assert(BM == 16 * MT * NW, "warps tile the query rows");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][STR]; later the output staging area
  T* sK = sQ + BM * STR;                   // [2][BN][STR]
  T* sV = sK + 2 * BN * STR;               // [2][BN][STR], only without LSE_ONLY

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest causal tiles start first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const int off = p.Nk - p.Nq;  // causal: key j is visible to row i iff j <= i + off

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int64_t* rows = p.rows ? p.rows + static_cast<int64_t>(b) * p.nrows : nullptr;

  // Query row read by tile row r, or -1 (past the end, or a skipped / out-of-range index).
  auto row_index = [&](int r) -> int {
    const int pos = m0 + r;
    if (pos >= p.nrows) return -1;
    if (!rows) return pos;
    const int64_t i = rows[pos];
    return (i >= 0 && i < p.Nq) ? static_cast<int>(i) : -1;
  };

  // With contiguous causal rows, keys past the last row's horizon are invisible to the whole tile.
  int n_end = p.Nk;
  if (p.causal && !rows) n_end = max(0, min(p.Nk, m0 + BM + off));
  const int n_tiles = (n_end + BN - 1) / BN;

  load_tile_async<BM, DP, STR, NT>(
      sQ, [&](int r) -> const T* { const int i = row_index(r); return i < 0 ? nullptr : q + i * p.q_sn; },
      p.D, q, tid);
  cp_async_commit();
  auto load_kv = [&](int tile, int buf) {
    const int n0 = tile * BN;
    load_tile_async<BN, DP, STR, NT>(
        sK + buf * BN * STR, [&](int r) -> const T* { return n0 + r < p.Nk ? k + (n0 + r) * p.k_sn : nullptr; },
        p.D, k, tid);
    if constexpr (!LSE_ONLY)
      load_tile_async<BN, DP, STR, NT>(
          sV + buf * BN * STR, [&](int r) -> const T* { return n0 + r < p.Nk ? v + (n0 + r) * p.v_sn : nullptr; },
          p.D, v, tid);
  };
  if (n_tiles > 0) load_kv(0, 0);
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
  int row_i[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) row_i[mt][hr] = row_index(wrow + mt * 16 + (lane >> 2) + hr * 8);

  float acc_o[MT][LSE_ONLY ? 1 : DB][4] = {};
  float m_run[MT][2], l_run[MT][2];  // running max (log2 domain) and this thread's partial sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) m_run[mt][hr] = -INFINITY, l_run[mt][hr] = 0.f;

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    // Prefetch tile t+1 into the other stage; the barrier that ended iteration t-1 guarantees
    // every warp is done reading it. An empty group keeps the wait count uniform.
    if (t + 1 < n_tiles) load_kv(t + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[MT][NB][4] = {};
    gemm_a_bt<MT, NB, DP, STR>(s, q_frag, sK + buf * BN * STR, lane);

    const int n0 = t * BN;
    const bool need_mask = n0 + BN > p.Nk || (p.causal && (rows != nullptr || n0 + BN - 1 > m0 + off));
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
            if (need_mask) {
              const int j = n0 + nb * 8 + (lane & 3) * 2 + e;
              if (j >= p.Nk || (p.causal && j > row_i[mt][hr] + off)) x = -INFINITY;
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

  float inv_l[MT][2];
  const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float l = quad_sum(l_run[mt][hr]);
      inv_l[mt][hr] = l > 0.f ? 1.f / l : 0.f;  // no visible key: out 0
      const int pos = m0 + wrow + mt * 16 + (lane >> 2) + hr * 8;
      if ((lane & 3) == 0 && pos < p.nrows)
        p.lse[bh * p.nrows + pos] = l > 0.f ? (m_run[mt][hr] + log2f(l)) * kLn2 : -INFINITY;
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
    // Token-major output ([B, Nq, Hq, D] memory, as SDPA): row pos of head h is at (b, pos, h).
    T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.Nq * p.Hq + h) * p.D;
    constexpr int CPR = DP / 8;
    for (int idx = lane; idx < 16 * MT * CPR; idx += 32) {
      const int r = idx / CPR, c = idx % CPR, pos = m0 + wrow + r;
      if (pos < p.Nq && c * 8 < p.D)
        *reinterpret_cast<uint4*>(out + static_cast<int64_t>(pos) * p.Hq * p.D + c * 8) =
            *reinterpret_cast<const uint4*>(sO + r * STR + c * 8);
    }
  }
}

template <typename T, int DP, bool LSE_ONLY>
constexpr size_t flash_smem_bytes() {
  return static_cast<size_t>(FlashCfg<DP>::BM + (LSE_ONLY ? 2 : 4) * FlashCfg<DP>::BN) * (DP + 8) * sizeof(T);
}

// Launches over grid (ceil(nrows / BM), Hq, B) on `stream`; the caller checks the launch error.
template <typename T, int DP, bool LSE_ONLY>
cudaError_t launch_flash_fwd(const FlashParams& p, int B, cudaStream_t stream) {
  constexpr size_t smem = flash_smem_bytes<T, DP, LSE_ONLY>();
  auto kernel = flash_fwd_kernel<T, DP, LSE_ONLY>;
  // More than the default 48 KiB of dynamic shared memory needs an explicit opt-in.
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.nrows + FlashCfg<DP>::BM - 1) / FlashCfg<DP>::BM, p.Hq, B);
  kernel<<<grid, FlashCfg<DP>::WARPS * 32, smem, stream>>>(p);
  return cudaSuccess;
}

}  // namespace vtattn
