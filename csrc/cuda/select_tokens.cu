// CUDA token selection: select_tokens, gather_tokens and merge_tokens share this one translation
// unit (the ATen CUDA headers dominate compile time; these kernels are small).
//
// select_tokens: one block per (segment, sample). The segment's score keys go to shared memory, a
// 4-pass 8-bit radix select finds the k-th largest key, and one ordered block scan marks the kept
// tokens (ties at the threshold to the lower indices) and compacts them: ascending order for free.
// gather_tokens: one warp per output row, 16-byte copies when the rows allow.
// merge_tokens: (1) per tile of tokens, a running argmax of cosine similarity over tiles of kept
// keys (never an [N, K] tensor); (2) per kept slot, its assigned rows summed in token order
// (deterministic, no float atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <limits>
#include <tuple>

#include "launch_plan.h"
#include "launch_utils.cuh"
#include "score_key.h"

namespace vtattn {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// ---- select_tokens ----------------------------------------------------------------------------

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

// ---- gather_tokens ----------------------------------------------------------------------------

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

// ---- merge_tokens -----------------------------------------------------------------------------

constexpr int kTile = plan::kMergeTile;  // tokens x kept tokens per similarity tile; a thread owns 4 x 4 of it
constexpr int kChunk = 32;  // key channels per shared-memory stage
using plan::kAssignThreads;
constexpr float kNormEps = 1e-12f;  // F.normalize's clamp: a zero key has cosine 0 with everything

// (cos, token) beats (best_cos, best) : higher cosine, ties to the lower kept token index.
__device__ __forceinline__ bool beats(float cos, int tok, float best_cos, int best) {
  return tok >= 0 && (best < 0 || cos > best_cos || (cos == best_cos && tok < best));
}

// assign[b, i] = the kept token index pruned token i folds into (-1: kept, or no kept token),
// weight[b, i] its weight. Rows ty + 16 r and columns tx + 16 c of each 64 x 64 tile belong to
// thread (ty, tx), so shared-memory reads are conflict-free.
template <typename T>
__global__ void __launch_bounds__(kAssignThreads)
    merge_assign_kernel(const T* __restrict__ keys, int64_t skb, int64_t skn, int64_t skc, int N, int D,
                        const int64_t* __restrict__ indices, int64_t sib, int64_t sik, int K,
                        const bool* __restrict__ mask, int64_t smb, int64_t smn, bool weighted,
                        int* __restrict__ assign, float* __restrict__ weight) {
  __shared__ float qs[kChunk][kTile + 1], ks[kChunk][kTile + 1];  // [channel][token], padded: no bank conflicts
  __shared__ float q_inv[kTile], k_inv[kTile];
  __shared__ int kept[kTile];
  const int b = blockIdx.y, i0 = blockIdx.x * kTile, tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const T* kb = keys + b * skb;
  auto pruned = [&](int i) { return i < N && !mask[b * smb + i * smn]; };

  float best_cos[4];
  int best[4];
  for (int r = 0; r < 4; ++r) best_cos[r] = -INFINITY, best[r] = -1;
  // A tile without pruned tokens has nothing to assign.
  const bool work = __syncthreads_or(tid < kTile && pruned(i0 + tid));
  for (int j0 = 0; work && j0 < K; j0 += kTile) {
    if (tid < kTile) {
      const int64_t v = j0 + tid < K ? indices[b * sib + (j0 + tid) * sik] : -1;
      kept[tid] = v >= 0 && v < N ? static_cast<int>(v) : -1;
    }
    __syncthreads();
    float acc[4][4] = {};
    float sq = 0.f;  // threads 0..63: squared norm of token row tid (first tile); 64..127: of kept key tid - 64
    for (int d0 = 0; d0 < D; d0 += kChunk) {
      for (int e = tid; e < kTile * kChunk; e += kAssignThreads) {
        const int t = e / kChunk, d = e % kChunk;  // consecutive threads read consecutive channels
        const bool in = d0 + d < D;
        qs[d][t] = in && i0 + t < N ? static_cast<float>(kb[(i0 + t) * skn + (d0 + d) * skc]) : 0.f;
        ks[d][t] = in && kept[t] >= 0 ? static_cast<float>(kb[kept[t] * skn + (d0 + d) * skc]) : 0.f;
      }
      __syncthreads();
      if (tid < kTile && j0 == 0)
        for (int d = 0; d < kChunk; ++d) sq += qs[d][tid] * qs[d][tid];
      else if (tid >= kTile && tid < 2 * kTile)
        for (int d = 0; d < kChunk; ++d) sq += ks[d][tid - kTile] * ks[d][tid - kTile];
#pragma unroll 8
      for (int d = 0; d < kChunk; ++d) {
        float a[4], c[4];
        for (int r = 0; r < 4; ++r) a[r] = qs[d][ty + 16 * r], c[r] = ks[d][tx + 16 * r];
        for (int r = 0; r < 4; ++r)
          for (int j = 0; j < 4; ++j) acc[r][j] += a[r] * c[j];
      }
      __syncthreads();
    }
    if (tid < kTile && j0 == 0) q_inv[tid] = 1.f / fmaxf(sqrtf(sq), kNormEps);
    if (tid >= kTile && tid < 2 * kTile) k_inv[tid - kTile] = 1.f / fmaxf(sqrtf(sq), kNormEps);
    __syncthreads();
    for (int r = 0; r < 4; ++r) {
      float c = -INFINITY;
      int tok = -1;
      for (int j = 0; j < 4; ++j) {
        const int col = tx + 16 * j;
        const float cos = acc[r][j] * q_inv[ty + 16 * r] * k_inv[col];
        if (beats(cos, kept[col], c, tok)) c = cos, tok = kept[col];
      }
      for (int o = 8; o >= 1; o >>= 1) {  // the 16 lanes sharing these rows agree on the best
        const float oc = __shfl_xor_sync(kFull, c, o);
        const int otok = __shfl_xor_sync(kFull, tok, o);
        if (beats(oc, otok, c, tok)) c = oc, tok = otok;
      }
      if (beats(c, tok, best_cos[r], best[r])) best_cos[r] = c, best[r] = tok;
    }
    __syncthreads();  // kept, k_inv are rewritten by the next tile
  }
  if (tx == 0) {
    for (int r = 0; r < 4; ++r) {
      const int i = i0 + ty + 16 * r;
      if (i >= N) continue;
      const bool merged = pruned(i) && best[r] >= 0;
      const int64_t at = static_cast<int64_t>(b) * N + i;  // B * N may pass 2^31
      assign[at] = merged ? best[r] : -1;
      weight[at] = !merged ? 0.f : weighted ? fmaxf(best_cos[r], 0.f) : 1.f;
    }
  }
}

using plan::kReduceThreads;
using plan::kReduceVec;  // channels per thread: a block covers 1024 channels of one kept slot

// out[b, c] = (x[kept c] + sum over i assigned to it, in token order, of w_i x_i) / (1 + sum w_i).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    merge_reduce_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxc, int N, int C,
                        const int64_t* __restrict__ indices, int64_t sib, int64_t sik, int K,
                        const int* __restrict__ assign, const float* __restrict__ weight, T* __restrict__ out) {
  __shared__ int list[kReduceThreads];
  __shared__ float list_w[kReduceThreads];
  __shared__ int warp_hits[kReduceThreads / 32];
  const int slot = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int ch0 = blockIdx.z * kReduceThreads * kReduceVec + tid;
  T* o = out + (static_cast<int64_t>(b) * K + slot) * C;
  const int64_t v = indices[b * sib + slot * sik];
  if (v < 0 || v >= N) {
    for (int e = 0; e < kReduceVec; ++e)
      if (ch0 + e * kReduceThreads < C) o[ch0 + e * kReduceThreads] = static_cast<T>(0.f);
    return;
  }
  const int idx = static_cast<int>(v);
  const T* xb = x + b * sxb;
  const int* assign_b = assign + static_cast<int64_t>(b) * N;  // B * N may pass 2^31
  const float* weight_b = weight + static_cast<int64_t>(b) * N;
  float acc[kReduceVec];
  for (int e = 0; e < kReduceVec; ++e) {
    const int ch = ch0 + e * kReduceThreads;
    acc[e] = ch < C ? static_cast<float>(xb[idx * sxn + ch * sxc]) : 0.f;
  }
  float wsum = 1.f;
  for (int base = 0; base < N; base += kReduceThreads) {
    // Compact this chunk's tokens assigned to the slot, in token order.
    const int i = base + tid;
    const bool hit = i < N && assign_b[i] == idx;
    const unsigned ballot = __ballot_sync(kFull, hit);
    if (lane == 0) warp_hits[warp] = __popc(ballot);
    __syncthreads();
    int pos = __popc(ballot & ((1u << lane) - 1)), hits = 0;
    for (int w = 0; w < kReduceThreads / 32; ++w) {
      pos += w < warp ? warp_hits[w] : 0;
      hits += warp_hits[w];
    }
    if (hit) list[pos] = i, list_w[pos] = weight_b[i];
    __syncthreads();
    for (int p = 0; p < hits; ++p) {
      const float w = list_w[p];
      const T* xi = xb + list[p] * sxn;
      for (int e = 0; e < kReduceVec; ++e) {
        const int ch = ch0 + e * kReduceThreads;
        if (ch < C) acc[e] += w * static_cast<float>(xi[ch * sxc]);
      }
      wsum += w;
    }
    __syncthreads();  // list is rewritten by the next chunk
  }
  for (int e = 0; e < kReduceVec; ++e) {
    const int ch = ch0 + e * kReduceThreads;
    if (ch < C) o[ch] = static_cast<T>(acc[e] / wsum);
  }
}

at::Tensor merge_tokens_cuda(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& indices,
                             const at::Tensor& mask, bool weighted) {
  TORCH_CHECK(x.is_cuda() && keys.device() == x.device() && indices.device() == x.device() &&
                  mask.device() == x.device(),
              "merge_tokens: x, keys, indices and mask must be on one CUDA device");
  TORCH_CHECK(x.dim() == 3 && keys.dim() == 3 && keys.size(0) == x.size(0) && keys.size(1) == x.size(1),
              "merge_tokens: x must be [B, N, C] and keys [B, N, Ck], got ", x.sizes(), " and ", keys.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(keys.scalar_type()),
              "merge_tokens: x and keys must be floating");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == x.size(0),
              "merge_tokens: indices must be int64 [B, K], got ", indices.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == x.size(0) &&
                  mask.size(1) == x.size(1),
              "merge_tokens: mask must be bool [B, N], got ", mask.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = indices.size(1);
  TORCH_CHECK(C < std::numeric_limits<int>::max() && keys.size(2) < std::numeric_limits<int>::max(),
              "merge_tokens: channel counts must fit in int32");
  const plan::Plan lp = plan::merge_tokens(B, N, C, K);
  TORCH_CHECK(lp.ok(), "merge_tokens: ", lp.error);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({B, K, C}, x.options());
  if (lp.n == 0) return out;  // empty output
  auto assign = at::empty({B, N}, x.options().dtype(at::kInt));
  auto weight = at::empty({B, N}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (lp.n == 2) {  // N > 0: the assignment pass
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "vtattn_merge_assign_cuda", [&] {
      C10_CUDA_CHECK(plan::launch(lp.launch[0], merge_assign_kernel<scalar_t>, stream, keys.const_data_ptr<scalar_t>(),
                                  keys.stride(0), keys.stride(1), keys.stride(2), static_cast<int>(N),
                                  static_cast<int>(keys.size(2)), indices.const_data_ptr<int64_t>(), indices.stride(0),
                                  indices.stride(1), static_cast<int>(K), mask.const_data_ptr<bool>(), mask.stride(0),
                                  mask.stride(1), weighted, assign.data_ptr<int>(), weight.data_ptr<float>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vtattn_merge_reduce_cuda", [&] {
    C10_CUDA_CHECK(plan::launch(lp.launch[lp.n - 1], merge_reduce_kernel<scalar_t>, stream,
                                x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
                                static_cast<int>(N), static_cast<int>(C), indices.const_data_ptr<int64_t>(),
                                indices.stride(0), indices.stride(1), static_cast<int>(K), assign.const_data_ptr<int>(),
                                weight.const_data_ptr<float>(), out.data_ptr<scalar_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) {
  m.impl("select_tokens", &vtattn::select_tokens_cuda);
  m.impl("gather_tokens", &vtattn::gather_tokens_cuda);
  m.impl("merge_tokens", &vtattn::merge_tokens_cuda);
}
