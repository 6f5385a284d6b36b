// CUDA paged_append: a decode step's k, v appended to a paged cache in one launch (kv.pages.Pages).
// A CTA per (batch, head) copies the head's n rows (16-byte pieces when the rows allow), writes their
// positions and scores, then moves the head's counters: one CTA owns them, so no other reads them
// while they move. No host read (CUDA graphs capture it) unless `start` is a CPU scalar.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "launch_plan.h"

namespace vtattn {
namespace {

using plan::kAppendThreads;

struct Rows {  // a [., ., ., units] view in units of U: k or v, or a pool seen as [P, page_size, units]
  int64_t s0, s1, s2, s3;
};

template <typename U>
__global__ void __launch_bounds__(kAppendThreads)
    paged_append_kernel(U* __restrict__ k_pages, U* __restrict__ v_pages, Rows kp, Rows vp, const U* __restrict__ k,
                        const U* __restrict__ v, Rows kr, Rows vr, int64_t units, int H, int64_t n, int64_t ps,
                        int64_t slots, int64_t* __restrict__ pos, int64_t sq0, int64_t sq1, float* __restrict__ score,
                        int64_t sc0, int64_t sc1, int64_t* __restrict__ next_slot, int64_t snb, int64_t snh,
                        int* __restrict__ lengths, int64_t sgb, int64_t sgh, const int64_t* __restrict__ last,
                        int64_t slb, int64_t slh, const int64_t* __restrict__ start_dev, int64_t start_host) {
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t s0 = next_slot[b * snb + h * snh];
  const int64_t cap = last != nullptr ? last[b * slb + h * slh] : s0 + n;
  // Token t's slot; clamped tokens all go to `cap`, and only the newest (t = n - 1) writes there.
  auto slot = [&](int64_t t) { return s0 + t >= cap ? (t == n - 1 ? cap : -1) : s0 + t; };
  for (int64_t i = threadIdx.x; i < 2 * n * units; i += blockDim.x) {
    const int64_t t = i / (2 * units), c = i % units;
    const bool is_v = i / units % 2;
    const int64_t s = slot(t);
    if (s < 0 || s >= slots) continue;  // memory safety: the caller's slots are valid
    const Rows& p = is_v ? vp : kp;
    const Rows& r = is_v ? vr : kr;
    (is_v ? v_pages : k_pages)[s / ps * p.s0 + s % ps * p.s1 + c * p.s2] =
        (is_v ? v : k)[b * r.s0 + h * r.s1 + t * r.s2 + c * r.s3];
  }
  const int64_t first = start_dev != nullptr ? *start_dev : start_host;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    const int64_t s = slot(t);
    if (s < 0 || s >= slots) continue;
    pos[s / ps * sq0 + s % ps * sq1] = first + t;
    if (score != nullptr) score[s / ps * sc0 + s % ps * sc1] = 0.f;
  }
  __syncthreads();  // every thread has read next_slot before it moves
  if (threadIdx.x == 0) {
    next_slot[b * snb + h * snh] = s0 + n;
    lengths[b * sgb + h * sgh] += static_cast<int>(n);
  }
}

void check_heads(const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Tensor& k) {
  TORCH_CHECK(t.device() == k.device() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == k.size(0) &&
                  t.size(1) == k.size(1),
              "paged_append: ", name, " must be ", dtype, " [B, H] on k's device, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

void check_slots(const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Tensor& pool) {
  TORCH_CHECK(t.device() == pool.device() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == pool.size(0) &&
                  t.size(1) == pool.size(1),
              "paged_append: ", name, " must be ", dtype, " of the pools' [P, page_size] on their device, got ",
              t.scalar_type(), " ", t.sizes());
}

template <typename U>
void launch(const plan::Launch& l, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
            const at::Tensor& next_slot, const at::Tensor& lengths, const at::Tensor& k, const at::Tensor& v,
            const int64_t* start_dev, int64_t start_host, const std::optional<at::Tensor>& last,
            const std::optional<at::Tensor>& score, cudaStream_t stream) {
  const int64_t per = static_cast<int64_t>(sizeof(U)) / k.element_size();  // elements per unit
  auto rows = [&](const at::Tensor& x) {
    return x.dim() == 3 ? Rows{x.stride(0) / per, x.stride(1) / per, per == 1 ? x.stride(2) : 1, 0}
                        : Rows{x.stride(0) / per, x.stride(1) / per, x.stride(2) / per, per == 1 ? x.stride(3) : 1};
  };
  const int64_t ps = k_pages.size(1);
  C10_CUDA_CHECK(plan::launch(
      l, paged_append_kernel<U>, stream, static_cast<U*>(k_pages.data_ptr()), static_cast<U*>(v_pages.data_ptr()),
      rows(k_pages), rows(v_pages), static_cast<const U*>(k.const_data_ptr()),
      static_cast<const U*>(v.const_data_ptr()),
      rows(k), rows(v), k.size(3) / per, static_cast<int>(k.size(1)), k.size(2), ps, k_pages.size(0) * ps,
      pos.data_ptr<int64_t>(), pos.stride(0), pos.stride(1), score ? score->data_ptr<float>() : nullptr,
      score ? score->stride(0) : 0, score ? score->stride(1) : 0, next_slot.data_ptr<int64_t>(), next_slot.stride(0),
      next_slot.stride(1), lengths.data_ptr<int>(), lengths.stride(0), lengths.stride(1),
      last ? last->const_data_ptr<int64_t>() : nullptr, last ? last->stride(0) : 0, last ? last->stride(1) : 0,
      start_dev, start_host));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte pieces when every row of the four tensors is whole pieces at 16-byte aligned addresses.
bool chunked(const at::Tensor& x) {
  const int64_t size = x.element_size();
  if (x.stride(-1) != 1 || (x.size(-1) * size) % 16 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) return false;
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    if ((x.stride(d) * size) % 16) return false;
  return true;
}

void paged_append_cuda(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos,
                       const at::Tensor& next_slot, const at::Tensor& lengths, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& start, const std::optional<at::Tensor>& last,
                       const std::optional<at::Tensor>& score) {
  TORCH_CHECK(k.is_cuda() && k.dim() == 4 && v.sizes() == k.sizes(),
              "paged_append: k and v must be CUDA [B, H, n, D] tensors of one shape, got ", k.sizes(), " and ",
              v.sizes());
  for (const auto* t : {&k_pages, &v_pages, &v})
    TORCH_CHECK(t->device() == k.device() && t->scalar_type() == k.scalar_type(),
                "paged_append: k_pages, v_pages, k and v must be on one device with one dtype, got ", t->scalar_type(),
                " on ", t->device());
  TORCH_CHECK(k_pages.dim() == 3 && v_pages.sizes() == k_pages.sizes() && k_pages.size(2) == k.size(3),
              "paged_append: k_pages and v_pages must be [P, page_size, D] with k's D, got ", k_pages.sizes());
  check_slots("pos", pos, at::kLong, k_pages);
  if (score) check_slots("score", *score, at::kFloat, k_pages);
  check_heads("next_slot", next_slot, at::kLong, k);
  check_heads("lengths", lengths, at::kInt, k);
  if (last) check_heads("last", *last, at::kLong, k);
  TORCH_CHECK(start.dim() == 0 && start.scalar_type() == at::kLong && (start.is_cpu() || start.device() == k.device()),
              "paged_append: start must be an int64 0-dim tensor on k's device or the CPU, got ", start.scalar_type(),
              " ", start.sizes(), " on ", start.device());
  const plan::Plan lp = plan::paged_append(k.size(0) * k.size(1), k.size(2));
  TORCH_CHECK(lp.ok(), "paged_append: ", lp.error);
  if (lp.n == 0) return;
  c10::cuda::CUDAGuard guard(k.device());
  const int64_t* start_dev = start.is_cpu() ? nullptr : start.const_data_ptr<int64_t>();
  const int64_t start_host = start.is_cpu() ? start.item<int64_t>() : 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t size = k.element_size();
  auto go = [&](auto unit) {
    launch<decltype(unit)>(lp.launch[0], k_pages, v_pages, pos, next_slot, lengths, k, v, start_dev, start_host, last,
                           score, stream);
  };
  if (chunked(k_pages) && chunked(v_pages) && chunked(k) && chunked(v)) go(uint4{});
  else if (size == 2) go(uint16_t{});
  else if (size == 4) go(uint32_t{});
  else TORCH_CHECK(false, "paged_append: unsupported element size ", size);
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("paged_append", &vtattn::paged_append_cuda); }
