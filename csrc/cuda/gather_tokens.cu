// CUDA gather_tokens: one warp per output row, 16-byte copies when the rows allow.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "launch_plan.h"

namespace vtattn {
namespace {

using plan::kGatherWarps;

// Output row r: padded layout -> (b, k) = (r / K, r % K); packed -> the sample whose cu_seqlens
// range holds r (binary search, as torch.searchsorted in the reference). Rows of x are `units`
// copies of U (16-byte chunks or single elements) with strides in U.
template <typename U>
__global__ void __launch_bounds__(kGatherWarps * 32)
    gather_kernel(const U* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxc, int64_t units, int B, int N,
                  int K, const int64_t* __restrict__ indices, int64_t sib, int64_t sik, const int* __restrict__ cu,
                  int64_t rows, U* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  int64_t b, k;
  if (cu == nullptr) {
    b = r / K, k = r % K;
  } else {
    int lo = 0, hi = B - 1;  // first b with cu[b + 1] > r, clamped to the last sample
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (cu[mid + 1] > r) hi = mid;
      else lo = mid + 1;
    }
    b = lo, k = r - cu[lo];
  }
  U* o = out + r * units;
  const int64_t idx = (k >= 0 && k < K) ? indices[b * sib + k * sik] : -1;
  if (idx < 0 || idx >= N) {
    for (int64_t c = lane; c < units; c += 32) o[c] = U{};
    return;
  }
  const U* src = x + b * sxb + idx * sxn;
  for (int64_t c = lane; c < units; c += 32) o[c] = src[c * sxc];
}

template <typename U>
void launch_gather(const plan::Launch& l, const at::Tensor& x, const at::Tensor& indices, const int* cu, int64_t rows,
                   at::Tensor& out, int64_t unit_bytes, cudaStream_t stream) {
  const int64_t per = unit_bytes / x.element_size();  // elements per unit (1 unless 16-byte chunks)
  const int64_t sxc = per == 1 ? x.stride(2) : 1;
  C10_CUDA_CHECK(plan::launch(l, gather_kernel<U>, stream, static_cast<const U*>(x.const_data_ptr()),
                              x.stride(0) / per, x.stride(1) / per, sxc, x.size(2) / per, static_cast<int>(x.size(0)),
                              static_cast<int>(x.size(1)), static_cast<int>(indices.size(1)),
                              indices.const_data_ptr<int64_t>(), indices.stride(0), indices.stride(1), cu, rows,
                              static_cast<U*>(out.data_ptr())));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& indices,
                              const std::optional<at::Tensor>& cu_seqlens, int64_t total) {
  TORCH_CHECK(x.is_cuda() && indices.device() == x.device(), "gather_tokens: x and indices must be on one CUDA device");
  TORCH_CHECK(x.dim() == 3, "gather_tokens: x must be [B, N, C], got ", x.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == x.size(0),
              "gather_tokens: indices must be int64 [B, K] with x's B, got ", indices.sizes());
  const int64_t B = x.size(0), K = indices.size(1), C = x.size(2), size = x.element_size();
  TORCH_CHECK(x.size(1) < std::numeric_limits<int>::max() && K < std::numeric_limits<int>::max(),
              "gather_tokens: N and K must fit in int32");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor cu;
  if (cu_seqlens.has_value()) {
    cu = cu_seqlens->to(at::kInt).contiguous();
    TORCH_CHECK(cu.device() == x.device() && cu.dim() == 1 && cu.size(0) == B + 1,
                "gather_tokens: cu_seqlens must be [B + 1] on x's device, got ", cu.sizes());
    TORCH_CHECK(total >= 0, "gather_tokens: total must be >= 0, got ", total);
  }
  const bool packed = cu.defined();
  auto out = packed ? at::empty({total, C}, x.options()) : at::empty({B, K, C}, x.options());
  const int64_t rows = packed ? (B > 0 ? total : 0) : B * K;
  const plan::Plan lp = plan::gather_tokens(rows, C);
  TORCH_CHECK(lp.ok(), "gather_tokens: ", lp.error);
  if (lp.n == 0) return out.zero_();
  const plan::Launch& l = lp.launch[0];
  const int* cu_ptr = packed ? cu.const_data_ptr<int>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // 16-byte chunks when a row is whole chunks at 16-byte aligned addresses.
  const bool chunks = x.stride(2) == 1 && (C * size) % 16 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                      (x.stride(0) * size) % 16 == 0 && (x.stride(1) * size) % 16 == 0;
  if (chunks) launch_gather<uint4>(l, x, indices, cu_ptr, rows, out, 16, stream);
  else if (size == 2) launch_gather<uint16_t>(l, x, indices, cu_ptr, rows, out, 2, stream);
  else if (size == 4) launch_gather<uint32_t>(l, x, indices, cu_ptr, rows, out, 4, stream);
  else if (size == 8) launch_gather<uint64_t>(l, x, indices, cu_ptr, rows, out, 8, stream);
  else if (size == 1) launch_gather<uint8_t>(l, x, indices, cu_ptr, rows, out, 1, stream);
  else TORCH_CHECK(false, "gather_tokens: unsupported element size ", size);
  return out;
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("gather_tokens", &vtattn::gather_tokens_cuda); }
