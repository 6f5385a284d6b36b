// Host-side helpers shared by the CUDA launchers (torch-free): grid limits, and the head-dim ->
// padded-head-dim mapping (and dtype dispatch) of the tensor-core kernel instantiations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "launch_plan.h"

namespace vtattn {

constexpr int kMaxHeadDim = 128;   // largest padded head dim instantiated
constexpr int kMaxGridYZ = static_cast<int>(plan::kMaxGridYZ);  // CUDA limit of gridDim.y / gridDim.z

// Padded head dim for the tensor-core kernels (a multiple of 16 >= D), 0 when unsupported.
inline int padded_head_dim(int64_t D) { return plan::flash_padded_dim(D); }

// Calls fn(T{}, std::integral_constant<int, DP>{}) with T = __half or __nv_bfloat16 and DP the
// padded head dim of D (which the caller has checked).
template <typename Fn>
void dispatch_half_dp(bool bf16, int64_t D, Fn&& fn) {
  auto by_dp = [&](auto tag) {
    switch (padded_head_dim(D)) {
      case 64: fn(tag, std::integral_constant<int, 64>{}); break;
      case 80: fn(tag, std::integral_constant<int, 80>{}); break;
      default: fn(tag, std::integral_constant<int, 128>{}); break;
    }
  };
  if (bf16) by_dp(__nv_bfloat16{});
  else by_dp(__half{});
}

}  // namespace vtattn
