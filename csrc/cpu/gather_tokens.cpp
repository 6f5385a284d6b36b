// CPU row gather: out[b, k] = x[b, indices[b, k]] (zero for indices outside [0, N)), or the
// packed varlen layout given cu_seqlens. A pure copy, so it moves bytes of any element size.
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace vtattn::cpu {
namespace {

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& indices,
                             const std::optional<at::Tensor>& cu_seqlens, int64_t total) {
  TORCH_CHECK(x.device().is_cpu() && indices.device().is_cpu(), "gather_tokens: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3, "gather_tokens: x must be [B, N, C], got ", x.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == x.size(0),
              "gather_tokens: indices must be int64 [B, K] with x's B, got ", indices.scalar_type(), " ",
              indices.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = indices.size(1);
  const bool packed = cu_seqlens.has_value();
  at::Tensor cu;
  if (packed) {
    cu = cu_seqlens->to(at::kLong).contiguous();
    TORCH_CHECK(cu.device().is_cpu() && cu.dim() == 1 && cu.size(0) == B + 1,
                "gather_tokens: cu_seqlens must be a CPU [B + 1] tensor, got ", cu.sizes());
    TORCH_CHECK(total >= 0, "gather_tokens: total must be >= 0, got ", total);
  }
  auto out = packed ? at::empty({total, C}, x.options()) : at::empty({B, K, C}, x.options());
  const int64_t size = x.element_size(), sxb = x.stride(0) * size, sxn = x.stride(1) * size, sxc = x.stride(2) * size;
  const int64_t row_bytes = C * size;
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  const int64_t* cp = packed ? cu.const_data_ptr<int64_t>() : nullptr;
  const int64_t sib = indices.stride(0), sik = indices.stride(1);

  const int64_t rows = packed ? (B > 0 ? total : 0) : B * K;
  if (rows == 0) return out.zero_();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // Packed row r belongs to the sample whose cu_seqlens range holds it (searchsorted, as the reference).
      const int64_t b = packed ? std::min<int64_t>(std::upper_bound(cp + 1, cp + B + 1, r) - (cp + 1), B - 1) : r / K;
      const int64_t k = packed ? r - cp[b] : r % K;
      const int64_t idx = k >= 0 && k < K ? ip[b * sib + k * sik] : -1;
      char* o = op + r * row_bytes;
      if (idx < 0 || idx >= N) {
        std::memset(o, 0, row_bytes);
        continue;
      }
      const char* src = xp + b * sxb + idx * sxn;
      if (sxc == size) {
        std::memcpy(o, src, row_bytes);
      } else {
        for (int64_t c = 0; c < C; ++c) std::memcpy(o + c * size, src + c * sxc, size);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace vtattn::cpu

TORCH_LIBRARY_IMPL(vtattn_C, CPU, m) { m.impl("gather_tokens", &vtattn::cpu::gather_tokens_cpu); }
