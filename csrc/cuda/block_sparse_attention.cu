// CUDA launcher of vtattn_C::block_sparse_attention: the tensor-core flash forward of attention.cu
// (csrc/include/flash_fwd.cuh) with the BlockSparseTile policy, fp16/bf16, head dims that are
// multiples of 8 up to 128, block_size a multiple of 128 (a CTA's rows in one query block). Only the
// listed key blocks stream through the cp.async ring; the lists are read in place (size-1 batch /
// head dims with stride 0), never expanded or copied unless their last dim is strided.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "flash_fwd.cuh"
#include "host_checks.h"
#include "launch_utils.cuh"

namespace vtattn {
namespace {

// An int32 block list on q's device whose last dim is unit-stride (a copy otherwise).
at::Tensor list_arg(const at::Tensor& t, int64_t dims, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device() && t.scalar_type() == at::kInt && t.dim() == dims, "block_sparse_attention: ",
              name, " must be a ", dims, "-D int32 tensor on q's device ", q.device(), ", got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, const at::Tensor& kv_num_blocks,
                                                               const at::Tensor& kv_indices, int64_t block_size,
                                                               bool causal, double scale) {
  host::check_q_k(q_in, k_in, "block_sparse_attention");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "block_sparse_attention: the CUDA kernel runs fp16/bf16 on tensor cores, got q dtype ",
              q_in.scalar_type(), " (fp32 goes to Triton)");
  TORCH_CHECK(v_in.device() == q_in.device() && v_in.scalar_type() == q_in.scalar_type() && v_in.sizes() == k_in.sizes(),
              "block_sparse_attention: v must have k's device, dtype and shape ", k_in.sizes(), ", got ",
              v_in.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  const at::Tensor num = list_arg(kv_num_blocks, 3, q_in, "kv_num_blocks");
  const at::Tensor idx = list_arg(kv_indices, 4, q_in, "kv_indices");
  TORCH_CHECK(block_size > 0, "block_sparse_attention: block_size must be positive, got ", block_size);
  const int64_t Qb = (Nq + block_size - 1) / block_size, Kb = (Nk + block_size - 1) / block_size;
  const int64_t Bm = num.size(0), Hm = num.size(1);
  TORCH_CHECK((Bm == 1 || Bm == B) && (Hm == 1 || Hm == Hq) && num.size(2) == Qb &&
                  idx.sizes() == at::IntArrayRef({Bm, Hm, Qb, Kb}),
              "block_sparse_attention: kv_num_blocks / kv_indices must be [B or 1, Hq or 1, ", Qb, "] / [.., ", Qb,
              ", ", Kb, "], got ", num.sizes(), " and ", idx.sizes());

  c10::cuda::CUDAGuard guard(q_in.device());
  const plan::Plan lp = plan::block_sparse_attention(plan::device_limits(*at::cuda::getCurrentDeviceProperties()),
                                                     Nq, Nk, Hq, B, D, q_in.element_size(), block_size);
  TORCH_CHECK(lp.ok(), "block_sparse_attention: ", lp.error);
  at::Tensor out = at::empty({B, Nq, Hq, D}, q_in.options()).transpose(1, 2);  // token-major
  at::Tensor lse = at::empty({B, Hq, Nq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Nk == 0) return {out.zero_(), lse.fill_(-INFINITY)};

  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor v = host::ready_for_16B_loads(v_in);

  BlockSparseParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  p.num = num.data_ptr<int>(), p.idx = idx.data_ptr<int>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sn = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  // A shared (size-1) batch / head dim is read with stride 0.
  p.num_sb = Bm > 1 ? num.stride(0) : 0, p.num_sh = Hm > 1 ? num.stride(1) : 0;
  p.idx_sb = Bm > 1 ? idx.stride(0) : 0, p.idx_sh = Hm > 1 ? idx.stride(1) : 0, p.idx_sm = idx.stride(2);
  p.Nq = static_cast<int>(Nq), p.Nk = static_cast<int>(Nk), p.Hq = static_cast<int>(Hq), p.D = static_cast<int>(D);
  p.group = static_cast<int>(Hq / Hkv), p.block_size = static_cast<int>(block_size), p.k_blocks = static_cast<int>(Kb);
  p.causal = causal;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_dp(q.scalar_type() == at::kBFloat16, D, [&](auto tag, auto dp) {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    C10_CUDA_CHECK((launch_flash<T, DP, false, BlockSparseTile<T>>(p, lp.launch[0], stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("block_sparse_attention", &vtattn::block_sparse_attention_cuda); }
