// CUDA launcher of vtattn_C::attention: FlashAttention-2 style forward on tensor cores
// (csrc/include/flash_fwd.cuh) for fp16/bf16, head dims that are multiples of 8 up to 128.
// Also defines the input helpers key_importance.cu shares (namespace vtattn::host).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "flash_fwd.cuh"
#include "host_checks.h"
#include "launch_utils.cuh"

namespace vtattn {
namespace host {  // declared in host_checks.h

at::Tensor ready_for_16B_loads(const at::Tensor& x) {
  const int64_t chunk = 16 / x.element_size();
  bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < x.dim(); ++d) ok = x.size(d) == 1 || x.stride(d) % chunk == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// Checks shared by attention and key_importance: 4-D CUDA q [B, Hq, Nq, D] and k [B, Hkv, Nk, D]
// on one device with one dtype, GQA head counts, a supported head dim and grid-sized B and Hq.
void check_q_k(const at::Tensor& q, const at::Tensor& k, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on q's device ", q.device(), ", got ", k.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, Hq, Nq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, Hkv, Nk, D], got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k dtype ", k.scalar_type(), " differs from q dtype ",
              q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k ", k.sizes(),
              " must have q's batch and head dim, q is ", q.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
              ") must be a multiple of k heads (", k.size(1), ")");
  TORCH_CHECK(padded_head_dim(q.size(3)) > 0, op, ": head dim ", q.size(3),
              " unsupported by the CUDA kernels (need a multiple of 8, at most ", kMaxHeadDim, ")");
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && q.size(1) <= kMaxGridYZ, op, ": q batch and heads must be <= ",
              kMaxGridYZ, ", got ", q.sizes());
  TORCH_CHECK(q.size(2) < std::numeric_limits<int>::max() && k.size(2) < std::numeric_limits<int>::max(), op,
              ": sequence lengths must fit in int32");
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, op, ": the CUDA kernels need compute capability >= 8.0, got ", prop->major, ".",
              prop->minor);
}

void check_options(const at::Tensor& q, double softcap, int64_t window, const std::optional<at::Tensor>& sinks,
                   const char* op) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = off), got ",
              softcap);
  TORCH_CHECK(window >= -1, op, ": window must be >= 0, or -1 for none, got ", window);
  if (sinks) {
    TORCH_CHECK(sinks->device() == q.device() && sinks->scalar_type() == at::kFloat && sinks->dim() == 1 &&
                    sinks->size(0) == q.size(1) && sinks->is_contiguous(),
                op, ": sinks must be a contiguous float32 [Hq] tensor on q's device with Hq = ", q.size(1), ", got ",
                sinks->scalar_type(), " ", sinks->sizes(), " on ", sinks->device());
  }
}

}  // namespace host

namespace {

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, bool causal, double scale,
                                                  double softcap, int64_t window,
                                                  const std::optional<at::Tensor>& sinks) {
  host::check_q_k(q_in, k_in, "attention");
  host::check_options(q_in, softcap, window, sinks, "attention");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "attention: the CUDA kernel runs fp16/bf16 on tensor cores, got q dtype ", q_in.scalar_type(),
              " (fp32 goes to Triton)");
  TORCH_CHECK(v_in.device() == q_in.device(), "attention: v must be on q's device ", q_in.device(), ", got ",
              v_in.device());
  TORCH_CHECK(v_in.scalar_type() == q_in.scalar_type(), "attention: v dtype ", v_in.scalar_type(),
              " differs from q dtype ", q_in.scalar_type());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "attention: v ", v_in.sizes(), " must have k's shape ", k_in.sizes());

  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  const plan::Plan lp = plan::flash(plan::device_limits(*at::cuda::getCurrentDeviceProperties()), Nq, Hq, B, D,
                                    q_in.element_size(), false, 0);
  TORCH_CHECK(lp.ok(), "attention: ", lp.error);
  // Token-major like SDPA's output: transformers' next transpose(1, 2) is then free.
  at::Tensor out = at::empty({B, Nq, Hq, D}, q_in.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, Hq, Nq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Nk == 0) {  // no keys: every row sees nothing (its lse is the sink, if any)
    out.zero_();
    if (sinks) lse.copy_(sinks->view({1, Hq, 1}).expand_as(lse));
    else lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor v = host::ready_for_16B_loads(v_in);

  FlashParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.rows = nullptr;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sn = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  p.nrows = static_cast<int>(Nq), p.Nq = static_cast<int>(Nq), p.Nk = static_cast<int>(Nk);
  p.Hq = static_cast<int>(Hq), p.D = static_cast<int>(D), p.group = static_cast<int>(Hq / Hkv);
  p.causal = causal;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.opt = AttnOptions::make(scale, softcap, window, sinks ? sinks->data_ptr<float>() : nullptr, Nk);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_dp(q.scalar_type() == at::kBFloat16, D, [&](auto tag, auto dp) {
    C10_CUDA_CHECK((launch_flash_fwd<decltype(tag), decltype(dp)::value, false>(p, lp.launch[0], stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("attention", &vtattn::attention_cuda); }
