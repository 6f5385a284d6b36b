// Host helpers of the CUDA launchers, defined in csrc/cuda/attention.cu.
#pragma once

#include <ATen/ATen.h>

namespace vtattn {
namespace host {

// Kernels read rows in 16-byte chunks: that needs a unit last stride, a 16-byte aligned start, and
// every other stride a whole number of chunks. Returns `x` when it qualifies, else a contiguous copy.
at::Tensor ready_for_16B_loads(const at::Tensor& x);

// q [B, Hq, Nq, D] and k [B, Hkv, Nk, D] for the tensor-core kernels; errors name `op`.
void check_q_k(const at::Tensor& q, const at::Tensor& k, const char* op);

}  // namespace host
}  // namespace vtattn
