// CUDA launcher of vtattn_C::varlen_attention: the tensor-core flash forward of attention.cu
// (csrc/include/flash_fwd.cuh) over packed [T, H, D] sequences, fp16/bf16, head dims that are
// multiples of 8 up to 128. One CTA per (query tile, head, sequence); tiles past a sequence's end
// return at once, so the grid is sized by max_seqlen_q and no length is read on the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "flash_fwd.cuh"
#include "host_checks.h"
#include "launch_utils.cuh"

namespace vtattn {
namespace {

struct VarlenParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;          // [Tq, Hq, D] contiguous
  float* lse;         // [Hq, Tq] contiguous, natural log
  const int* cu_q;    // [B + 1]: sequence b is rows cu[b] .. cu[b+1] of q (of k with cu_k)
  const int* cu_k;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh;  // element strides (token, head)
  int Tq, Tk, Hq, D, group;                    // group = Hq / Hkv
  bool causal;
  float scale_log2;
  AttnOptions opt;  // read only by VarlenTile<T, true>
};

// Tile policy of flash_fwd.cuh: rows and keys of one sequence, causal end-aligned within it.
// Addresses are rebuilt from the kernel parameters and the sequence's offsets on each use: the
// offsets come from global loads, and keeping whole pointers live instead costs spills.
template <typename T, bool OPT> struct VarlenTile {
  using Params = VarlenParams;
  using RowKey = int;  // the row's horizon within the sequence: keys j <= it are visible under causal
  static constexpr size_t kExtraSmem = 0;
  static constexpr bool kOptions = OPT;

  const Params& p;
  int q0, k0, h, hk, m0, lq, off, n_keys, key_end;
  int key_begin = 0, lo_last = 0;  // OPT: keys before the first row's window, the last row's left bound

  __device__ __forceinline__ VarlenTile(const Params& p_, int m0_, int BM, int h_, int b, void*)
      : p(p_), h(h_), hk(h_ / p_.group), m0(m0_) {
    // cu_seqlens go unvalidated under torch.compile and internal calls: clamped into the packed
    // tensors and made non-decreasing, so no row or key leaves them (valid offsets are unchanged).
    q0 = min(max(p.cu_q[b], 0), p.Tq);
    lq = min(max(p.cu_q[b + 1], q0), p.Tq) - q0;
    k0 = min(max(p.cu_k[b], 0), p.Tk);
    n_keys = min(max(p.cu_k[b + 1], k0), p.Tk) - k0;
    off = n_keys - lq;
    key_end = p.causal ? max(0, min(n_keys, m0 + BM + off)) : n_keys;  // keys past the tile's horizon
    if constexpr (OPT) {
      lo_last = m0 + BM - 1 + off - p.opt.window;
      if (p.opt.window >= 0) key_begin = max(0, m0 + off - p.opt.window);
    }
  }
  __device__ __forceinline__ bool empty() const { return m0 >= lq; }
  __device__ __forceinline__ bool row_ok(int r) const { return m0 + r < lq; }
  __device__ __forceinline__ int64_t q_token(int r) const { return static_cast<int64_t>(q0) + m0 + r; }
  __device__ __forceinline__ const T* q_row(int r) const {
    return row_ok(r) ? static_cast<const T*>(p.q) + q_token(r) * p.q_st + h * p.q_sh : nullptr;
  }
  __device__ __forceinline__ const T* k_row(int j) const {
    return static_cast<const T*>(p.k) + (static_cast<int64_t>(k0) + j) * p.k_st + hk * p.k_sh;
  }
  __device__ __forceinline__ const T* v_row(int j) const {
    return static_cast<const T*>(p.v) + (static_cast<int64_t>(k0) + j) * p.v_st + hk * p.v_sh;
  }
  template <int BN, int NT> __device__ __forceinline__ void stage_keys(int, int, int) {}
  __device__ __forceinline__ RowKey row_key(int r) const { return m0 + r + off; }
  __device__ __forceinline__ bool needs_causal(int n0, int BN) const {
    if constexpr (OPT)
      if (p.opt.window >= 0 && n0 < lo_last) return true;
    return p.causal && n0 + BN - 1 > m0 + off;
  }
  __device__ __forceinline__ bool visible(RowKey horizon, int j, int) const {
    if constexpr (OPT) return (!p.causal || j <= horizon) && (p.opt.window < 0 || j >= horizon - p.opt.window);
    return j <= horizon;
  }
  __device__ __forceinline__ float* lse_at(int r) const {
    return row_ok(r) ? p.lse + static_cast<int64_t>(h) * p.Tq + q_token(r) : nullptr;
  }
  __device__ __forceinline__ T* out_at(int r) const {
    return row_ok(r) ? static_cast<T*>(p.out) + (q_token(r) * p.Hq + h) * p.D : nullptr;
  }
};

// cu_seqlens must be int32 [B + 1] on q's device; its values are trusted (the public function
// checks them on the host).
void check_cu(const at::Tensor& cu, int64_t B, const at::Tensor& q, const char* name) {
  TORCH_CHECK(cu.device() == q.device() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() == B + 1,
              "varlen_attention: ", name, " must be int32 [B + 1] on q's device ", q.device(), ", got ",
              cu.scalar_type(), " ", cu.sizes(), " on ", cu.device());
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& cu_q_in,
                                                         const at::Tensor& cu_k_in, int64_t max_seqlen_q,
                                                         bool causal, double scale, double softcap, int64_t window,
                                                         const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3, "varlen_attention: q and k must be packed [T, H, D], got ",
              q_in.sizes(), " and ", k_in.sizes());
  // The checks of attention on [1, H, T, D] views (device, dtype, GQA, head dim, int32 lengths).
  host::check_q_k(q_in.unsqueeze(0).transpose(1, 2), k_in.unsqueeze(0).transpose(1, 2), "varlen_attention");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "varlen_attention: the CUDA kernel runs fp16/bf16 on tensor cores, got q dtype ", q_in.scalar_type(),
              " (fp32 goes to Triton)");
  TORCH_CHECK(v_in.device() == q_in.device() && v_in.scalar_type() == q_in.scalar_type() && v_in.sizes() == k_in.sizes(),
              "varlen_attention: v must have k's device, dtype and shape ", k_in.sizes(), ", got ", v_in.sizes());
  const int64_t B = cu_q_in.numel() - 1;
  TORCH_CHECK(B >= 0 && B <= kMaxGridYZ, "varlen_attention: the number of sequences must be in [0, ", kMaxGridYZ,
              "], got ", B);
  check_cu(cu_q_in, B, q_in, "cu_seqlens_q");
  check_cu(cu_k_in, B, q_in, "cu_seqlens_k");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q < std::numeric_limits<int>::max(),
              "varlen_attention: max_seqlen_q must lie in [0, 2^31 - 1), got ", max_seqlen_q);
  host::check_options(q_in, softcap, window, sinks, "varlen_attention");

  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t Tq = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2), Hkv = k_in.size(1);
  const plan::Plan lp = plan::flash(plan::device_limits(*at::cuda::getCurrentDeviceProperties()), max_seqlen_q, Hq,
                                    B, D, q_in.element_size(), false, 0);
  TORCH_CHECK(lp.ok(), "varlen_attention: ", lp.error);
  at::Tensor out = at::empty({Tq, Hq, D}, q_in.options());
  at::Tensor lse = at::empty({Hq, Tq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0 || B == 0 || max_seqlen_q == 0) return {out, lse};  // no query rows at all

  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor v = host::ready_for_16B_loads(v_in);
  const at::Tensor cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();

  VarlenParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  p.cu_q = cu_q.data_ptr<int>(), p.cu_k = cu_k.data_ptr<int>();
  p.q_st = q.stride(0), p.q_sh = q.stride(1), p.k_st = k.stride(0), p.k_sh = k.stride(1);
  p.v_st = v.stride(0), p.v_sh = v.stride(1);
  p.Tq = static_cast<int>(Tq), p.Tk = static_cast<int>(k.size(0));
  p.Hq = static_cast<int>(Hq), p.D = static_cast<int>(D);
  p.group = static_cast<int>(Hq / Hkv);
  p.causal = causal;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.opt = AttnOptions::make(scale, softcap, window, sinks ? sinks->data_ptr<float>() : nullptr, k.size(0));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_dp(q.scalar_type() == at::kBFloat16, D, [&](auto tag, auto dp) {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    C10_CUDA_CHECK((p.opt.any() ? launch_flash<T, DP, false, VarlenTile<T, true>>(p, lp.launch[0], stream)
                                : launch_flash<T, DP, false, VarlenTile<T, false>>(p, lp.launch[0], stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("varlen_attention", &vtattn::varlen_attention_cuda); }
