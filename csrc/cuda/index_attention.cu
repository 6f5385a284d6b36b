// CUDA launcher of vtattn_C::index_attention: the tensor-core flash forward of attention.cu
// (csrc/include/flash_fwd.cuh) over the keys listed per (batch, kv head), fp16/bf16, head dims
// that are multiples of 8 up to 128. K/V rows are fetched by index straight into shared memory
// (cp.async), never gathered into a copy. Listed keys may come in any order, so every key tile
// takes the causal rule (by original positions, staged in shared memory per tile).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "flash_fwd.cuh"
#include "host_checks.h"
#include "launch_utils.cuh"

namespace vtattn {
namespace {

struct IndexParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;                // [B, Hq, Nq, D] stored token-major ([B, Nq, Hq, D] memory)
  const int64_t* idx;       // [B, Hkv, L] contiguous; the first counts[b, g] are keys in [0, Nk)
  const int* counts;        // [B, Hkv] contiguous
  const int64_t* q_pos;     // [B, Nq] contiguous
  const int64_t* kv_pos;    // [B, Nk] contiguous
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;  // element strides
  int Nq, Nk, L, Hq, D, group;                                    // group = Hq / Hkv
  bool causal;
  float scale_log2;
};

// Tile policy of flash_fwd.cuh: key slot j is the listed key idx[j]. Indices are trusted (the
// public function checks them); one outside [0, Nk) reads a zero row and is hidden under causal,
// so a bad list gives wrong numbers, never an out-of-bounds read.
template <typename T> struct IndexTile {
  using Params = IndexParams;
  using RowKey = int64_t;  // the row's original position
  static constexpr int kBN = plan::kFlashBN;  // key tile of every instantiation
  static constexpr size_t kExtraSmem = 2 * kBN * sizeof(int64_t);  // key positions, per stage (kIndexExtraSmem)

  const T *q, *k, *v;
  const int64_t *idx, *q_pos, *kv_pos;
  int64_t* kpos;  // shared [2][kBN]
  T* out;
  int64_t q_sn, k_sn, v_sn, out_sn;
  int m0, Nq, Nk, n_keys, key_end;
  bool causal;

  __device__ __forceinline__ IndexTile(const Params& p, int m0_, int, int h, int b, void* extra) {
    const int hk = h / p.group;
    const int64_t bk = static_cast<int64_t>(b) * (p.Hq / p.group) + hk;
    idx = p.idx + bk * p.L;
    n_keys = key_end = min(max(p.counts[bk], 0), p.L);
    q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    q_pos = p.q_pos + static_cast<int64_t>(b) * p.Nq;
    kv_pos = p.kv_pos + static_cast<int64_t>(b) * p.Nk;
    kpos = static_cast<int64_t*>(extra);
    out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.Nq * p.Hq + h) * p.D;
    q_sn = p.q_sn, k_sn = p.k_sn, v_sn = p.v_sn, out_sn = static_cast<int64_t>(p.Hq) * p.D;
    m0 = m0_, Nq = p.Nq, Nk = p.Nk, causal = p.causal;
  }
  __device__ __forceinline__ bool empty() const { return false; }
  // Key row of slot j (< n_keys), or -1 when the list entry is out of range.
  __device__ __forceinline__ int64_t key(int j) const {
    const int64_t i = idx[j];
    return i >= 0 && i < Nk ? i : -1;
  }
  __device__ __forceinline__ const T* q_row(int r) const { return m0 + r < Nq ? q + (m0 + r) * q_sn : nullptr; }
  __device__ __forceinline__ const T* k_row(int j) const {
    const int64_t i = key(j);
    return i < 0 ? nullptr : k + i * k_sn;
  }
  __device__ __forceinline__ const T* v_row(int j) const {
    const int64_t i = key(j);
    return i < 0 ? nullptr : v + i * v_sn;
  }
  // Positions of the tile's keys into stage `buf` (plain stores, published by the barrier that
  // precedes the tile's use; the stage's previous readers finished before the last barrier).
  template <int BN, int NT> __device__ __forceinline__ void stage_keys(int n0, int buf, int tid) {
    static_assert(BN == kBN, "kExtraSmem holds two stages of kBN keys");
    if (!causal) return;
    for (int jl = tid; jl < BN; jl += NT) {
      const int64_t i = n0 + jl < n_keys ? key(n0 + jl) : -1;
      kpos[buf * BN + jl] = i < 0 ? std::numeric_limits<int64_t>::max() : kv_pos[i];
    }
  }
  __device__ __forceinline__ RowKey row_key(int r) const { return m0 + r < Nq ? q_pos[m0 + r] : 0; }
  __device__ __forceinline__ bool needs_causal(int, int) const { return causal; }
  __device__ __forceinline__ bool visible(RowKey qpos, int, int slot) const { return kpos[slot] <= qpos; }
  __device__ __forceinline__ float* lse_at(int) const { return nullptr; }  // the op returns no LSE
  __device__ __forceinline__ T* out_at(int r) const { return m0 + r < Nq ? out + (m0 + r) * out_sn : nullptr; }
};

constexpr int64_t kIndexExtraSmem = 2 * plan::kFlashBN * sizeof(int64_t);  // IndexTile's, for the plan

// An integer tensor of `dtype` and `sizes` on q's device, made contiguous.
at::Tensor int_arg(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef sizes, const at::Tensor& q,
                   const char* name) {
  TORCH_CHECK(t.device() == q.device() && t.scalar_type() == dtype && t.sizes() == sizes, "index_attention: ", name,
              " must be ", dtype, " ", sizes, " on q's device ", q.device(), ", got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  return t.contiguous();
}

at::Tensor index_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                               const at::Tensor& kv_indices, const at::Tensor& kv_counts,
                               const at::Tensor& q_positions, const at::Tensor& kv_positions, bool causal,
                               double scale) {
  host::check_q_k(q_in, k_in, "index_attention");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "index_attention: the CUDA kernel runs fp16/bf16 on tensor cores, got q dtype ", q_in.scalar_type(),
              " (fp32 goes to Triton)");
  TORCH_CHECK(v_in.device() == q_in.device() && v_in.scalar_type() == q_in.scalar_type() && v_in.sizes() == k_in.sizes(),
              "index_attention: v must have k's device, dtype and shape ", k_in.sizes(), ", got ", v_in.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  TORCH_CHECK(kv_indices.dim() == 3, "index_attention: kv_indices must be [B, Hkv, L], got ", kv_indices.sizes());
  const int64_t L = kv_indices.size(2);
  TORCH_CHECK(L < std::numeric_limits<int>::max(), "index_attention: L must fit in int32, got ", L);
  const at::Tensor idx = int_arg(kv_indices, at::kLong, {B, Hkv, L}, q_in, "kv_indices");
  const at::Tensor cnt = int_arg(kv_counts, at::kInt, {B, Hkv}, q_in, "kv_counts");
  const at::Tensor qp = int_arg(q_positions, at::kLong, {B, Nq}, q_in, "q_positions");
  const at::Tensor kp = int_arg(kv_positions, at::kLong, {B, Nk}, q_in, "kv_positions");

  c10::cuda::CUDAGuard guard(q_in.device());
  const plan::Plan lp = plan::flash(plan::device_limits(*at::cuda::getCurrentDeviceProperties()), Nq, Hq, B, D,
                                    q_in.element_size(), false, kIndexExtraSmem);
  TORCH_CHECK(lp.ok(), "index_attention: ", lp.error);
  at::Tensor out = at::empty({B, Nq, Hq, D}, q_in.options()).transpose(1, 2);  // token-major
  if (out.numel() == 0) return out;
  if (Nk == 0 || L == 0) return out.zero_();  // no key can be listed

  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor v = host::ready_for_16B_loads(v_in);

  IndexParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.out = out.data_ptr();
  p.idx = idx.data_ptr<int64_t>(), p.counts = cnt.data_ptr<int>();
  p.q_pos = qp.data_ptr<int64_t>(), p.kv_pos = kp.data_ptr<int64_t>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sn = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  p.Nq = static_cast<int>(Nq), p.Nk = static_cast<int>(Nk), p.L = static_cast<int>(L);
  p.Hq = static_cast<int>(Hq), p.D = static_cast<int>(D), p.group = static_cast<int>(Hq / Hkv);
  p.causal = causal;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_dp(q.scalar_type() == at::kBFloat16, D, [&](auto tag, auto dp) {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    static_assert(IndexTile<T>::kExtraSmem == kIndexExtraSmem, "the plan's extra shared memory");
    C10_CUDA_CHECK((launch_flash<T, DP, false, IndexTile<T>>(p, lp.launch[0], stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("index_attention", &vtattn::index_attention_cuda); }
