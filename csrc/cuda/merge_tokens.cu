// CUDA merge_tokens: (1) per tile of tokens, a running argmax of cosine similarity over tiles of
// kept keys (never an [N, K] tensor); (2) per kept slot, its assigned rows summed in token order
// (deterministic, no float atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "launch_plan.h"

namespace vtattn {
namespace {

constexpr unsigned kFull = 0xffffffffu;

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

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("merge_tokens", &vtattn::merge_tokens_cuda); }
