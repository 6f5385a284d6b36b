// Host helpers of the CUDA launchers, defined in csrc/cuda/attention.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vtattn {
namespace host {

// Kernels read rows in 16-byte chunks: that needs a unit last stride, a 16-byte aligned start, and
// every other stride a whole number of chunks. Returns `x` when it qualifies, else a contiguous copy.
at::Tensor ready_for_16B_loads(const at::Tensor& x);

// q [B, Hq, Nq, D] and k [B, Hkv, Nk, D] for the tensor-core kernels; errors name `op`.
void check_q_k(const at::Tensor& q, const at::Tensor& k, const char* op);

// softcap (>= 0, finite; 0 = off), window (>= -1; -1 = off) and sinks (None, or fp32 contiguous
// [Hq] on q's device, Hq = q.size(1)) of the attention family; errors name `op` and the argument.
void check_options(const at::Tensor& q, double softcap, int64_t window, const std::optional<at::Tensor>& sinks,
                   const char* op);

}  // namespace host
}  // namespace vtattn
