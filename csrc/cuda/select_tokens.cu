// CUDA select_tokens: one block per (segment, sample). The segment's score keys go to shared
// memory, a 4-pass 8-bit radix select finds the k-th largest key, and one ordered block scan marks
// the kept tokens (ties at the threshold to the lower indices) and compacts them: ascending order
// for free.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <tuple>

#include "launch_plan.h"
#include "score_key.h"

namespace vtattn {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Threads, segment limits and shared memory: csrc/include/launch_plan.h (plan::select_tokens).
using plan::kMaxSegments;
using plan::kSelectThreads;

struct Segments {  // passed by value: no device copy of the layout, so no host sync
  int count;
  int offset[kMaxSegments + 1];
};

template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const T* __restrict__ scores, int64_t ssb, int64_t ssn, const int64_t* __restrict__ budgets,
                  int64_t sbb, int64_t sbs, const Segments seg, int N, int K, bool sort,
                  int64_t* __restrict__ indices, bool* __restrict__ mask, int64_t* __restrict__ counts) {
  using Reduce = cub::BlockReduce<unsigned long long, kSelectThreads>;
  using Scan = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ unsigned hist[256];
  __shared__ unsigned sh_prefix, sh_need;
  __shared__ unsigned long long sh_sums;
  extern __shared__ uint32_t smem[];  // keys[L], then the kept list[L] (segment-local indices)

  const int s = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int start = seg.offset[s], L = seg.offset[s + 1] - start;
  auto budget = [&](int t) {  // clamped to its segment: safe on any input
    const int64_t len = seg.offset[t + 1] - seg.offset[t];
    return static_cast<unsigned>(std::min(std::max(budgets[b * sbb + t * sbs], int64_t(0)), len));
  };
  // This segment's first output slot (budgets of the segments before it) and the sample's total,
  // packed as (before << 32 | total): both fit 32 bits since N does.
  unsigned long long mine = 0;
  if (tid < seg.count) mine = (tid < s ? static_cast<unsigned long long>(budget(tid)) << 32 : 0ull) | budget(tid);
  const unsigned long long sums = Reduce(tmp.reduce).Sum(mine);
  if (tid == 0) sh_sums = sums;
  __syncthreads();
  const int first = static_cast<int>(sh_sums >> 32), total = static_cast<int>(sh_sums & kFull);
  const unsigned k = budget(s);
  int64_t* out = indices + static_cast<int64_t>(b) * K;
  bool* m = mask + static_cast<int64_t>(b) * N + start;
  if (s == 0 && tid == 0) counts[b] = total;
  if (s == seg.count - 1)
    for (int p = std::min(total, K) + tid; p < K; p += kSelectThreads) out[p] = -1;
  if (k == 0) {
    for (int i = tid; i < L; i += kSelectThreads) m[i] = false;
    return;
  }

  uint32_t* keys = smem;
  int* kept = reinterpret_cast<int*>(smem + L);
  for (int i = tid; i < L; i += kSelectThreads)
    keys[i] = score_key(static_cast<float>(scores[b * ssb + (start + i) * ssn]));

  // Keep keys > thr and the first `need` keys == thr. k == L keeps everything: every key is > 0.
  uint32_t thr = 0;
  unsigned need = 0;
  if (k < static_cast<unsigned>(L)) {
    uint32_t prefix = 0, prefix_mask = 0;
    need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
      __syncthreads();
      for (int i = tid; i < L; i += kSelectThreads)
        if ((keys[i] & prefix_mask) == prefix) atomicAdd(&hist[(keys[i] >> shift) & 255u], 1u);
      __syncthreads();
      if (tid < 32) {  // find the digit where the count from the top reaches `need`
        unsigned c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += c[j] = hist[255 - 8 * tid - j];  // lane owns 8 digits, descending
        unsigned incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned v = __shfl_up_sync(kFull, incl, o);
          if (tid >= o) incl += v;
        }
        unsigned run = incl - sum;
        if (run < need && need <= incl) {
          for (int j = 0; j < 8; ++j) {
            if (run + c[j] >= need) {
              sh_prefix = prefix | (static_cast<uint32_t>(255 - 8 * tid - j) << shift);
              sh_need = need - run;
              break;
            }
            run += c[j];
          }
        }
      }
      __syncthreads();
      prefix = sh_prefix;
      need = sh_need;
      prefix_mask |= 255u << shift;
    }
    thr = prefix;
  }

  // One ordered pass: exclusive counts of (key > thr, key == thr) before each token give its
  // kept slot, so the kept list comes out in ascending token order.
  unsigned long long carry = 0;
  for (int base = 0; base < L; base += kSelectThreads) {
    const int i = base + tid;
    const uint32_t u = i < L ? keys[i] : 0u;
    const unsigned long long flag = i >= L ? 0ull : u > thr ? 1ull << 32 : u == thr ? 1ull : 0ull;
    unsigned long long before, chunk;
    Scan(tmp.scan).ExclusiveSum(flag, before, chunk);
    before += carry;
    carry += chunk;
    if (i < L) {
      const unsigned gt = static_cast<unsigned>(before >> 32), eq = static_cast<unsigned>(before & kFull);
      const bool keep = u > thr || (u == thr && eq < need);
      m[i] = keep;
      if (keep) kept[gt + std::min(eq, need)] = i;
    }
    __syncthreads();  // tmp.scan is reused; the kept list is complete after the last chunk
  }

  if (sort) {
    for (unsigned p = tid; p < k; p += kSelectThreads)
      if (first + p < static_cast<unsigned>(K)) out[first + p] = start + kept[p];
    return;
  }
  // Descending score: a kept token's slot is the number of kept tokens that beat it (one warp each).
  const int warp = tid / 32, lane = tid % 32;
  for (unsigned p = warp; p < k; p += kSelectThreads / 32) {
    const int i = kept[p];
    const uint32_t u = keys[i];
    unsigned rank = 0;
    for (unsigned q = lane; q < k; q += 32) {
      const int j = kept[q];
      rank += keys[j] > u || (keys[j] == u && j < i);
    }
    rank = __reduce_add_sync(kFull, rank);
    if (lane == 0 && first + rank < static_cast<unsigned>(K)) out[first + rank] = start + i;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tokens_cuda(const at::Tensor& scores, const at::Tensor& budgets,
                                                                  at::IntArrayRef segments, int64_t max_keep,
                                                                  bool sort) {
  TORCH_CHECK(scores.is_cuda() && budgets.device() == scores.device(),
              "select_tokens: scores and budgets must be on one CUDA device");
  TORCH_CHECK(scores.dim() == 2 && at::isFloatingType(scores.scalar_type()),
              "select_tokens: scores must be a floating [B, N] tensor, got ", scores.scalar_type(), " ",
              scores.sizes());
  const int64_t B = scores.size(0), N = scores.size(1), S = segments.size();
  TORCH_CHECK(budgets.scalar_type() == at::kLong && budgets.dim() == 2 && budgets.size(0) == B &&
                  budgets.size(1) == S,
              "select_tokens: budgets must be int64 [B, S] = [", B, ", ", S, "], got ", budgets.sizes());
  TORCH_CHECK(max_keep >= 0 && max_keep <= N, "select_tokens: max_keep must be in [0, N], got ", max_keep);
  int64_t longest = 0;
  for (int64_t i = 0; i < S; ++i) {
    TORCH_CHECK(segments[i] >= 0, "select_tokens: segment lengths must be >= 0, got ", segments[i]);
    longest = std::max(longest, segments[i]);
  }
  c10::cuda::CUDAGuard guard(scores.device());
  const plan::Device device = plan::device_limits(*at::cuda::getCurrentDeviceProperties());
  const plan::Plan lp = plan::select_tokens(device, B, S, longest);
  TORCH_CHECK(lp.ok(), "select_tokens: ", lp.error);
  Segments seg{};
  seg.count = static_cast<int>(S);
  for (int64_t i = 0; i < S; ++i) seg.offset[i + 1] = seg.offset[i] + static_cast<int>(segments[i]);
  TORCH_CHECK(seg.offset[S] == N, "select_tokens: segments must sum to N = ", N);

  auto indices = at::empty({B, max_keep}, scores.options().dtype(at::kLong));
  auto mask = at::empty({B, N}, scores.options().dtype(at::kBool));
  auto counts = at::empty({B}, scores.options().dtype(at::kLong));
  if (lp.n == 0) return {indices, mask, counts};  // B == 0
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "vtattn_select_tokens_cuda", [&] {
    C10_CUDA_CHECK(plan::launch(
        lp.launch[0], select_kernel<scalar_t>, stream, scores.const_data_ptr<scalar_t>(), scores.stride(0),
        scores.stride(1), budgets.const_data_ptr<int64_t>(), budgets.stride(0), budgets.stride(1), seg,
        static_cast<int>(N), static_cast<int>(max_keep), sort, indices.data_ptr<int64_t>(), mask.data_ptr<bool>(),
        counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, mask, counts};
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("select_tokens", &vtattn::select_tokens_cuda); }
