// Ranking key of a score, shared by the CPU and CUDA token-selection kernels (torch-free).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VTATTN_HOST_DEVICE inline
#endif

namespace vtattn {

// An unsigned key with the order of the float scores, so selection works on integers (radix
// passes, exact ties): -0 ties with +0 and every NaN ranks as one value above +inf, as torch.sort
// (the reference) orders them. Ties between equal keys go to the lower token index.
VTATTN_HOST_DEVICE uint32_t score_key(float x) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  if (x != x) bits = 0x7fc00000u;
  else if (x == 0.f) bits = 0u;
  // Positive floats: set the sign bit; negative: flip all bits (larger magnitude -> smaller key).
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace vtattn
