// CUDA launcher and kernels of vtattn_C::decode_attention: one decode step over a KV cache whose
// valid prefix lengths[b, g] varies per (batch, kv head). Memory-bound split-KV (flash-decoding):
//
//  split kernel: a CTA per (batch * kv head, split of the key range). TPK threads share one key
//    row (16-byte loads each); every thread issues the K and V loads of its KPT keys of a tile at
//    once, computes the logits of all query heads of the GQA group (K and V are read once per
//    group), the CTA does the tile's softmax statistics in shared memory, then each thread
//    accumulates p * v for its keys. Writes the split's normalised partial output and log2 LSE.
//  merge kernel: a CTA per query head combines the splits that saw keys by their LSE.
//
// The split count depends on shapes and the SM count only, never on lengths: no host sync, so
// the op can be captured in a CUDA graph. Splits that start past a head's length return at once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "launch_utils.cuh"
#include "mma_sm80.cuh"

namespace vtattn {
namespace host {  // defined in attention.cu
at::Tensor ready_for_16B_loads(const at::Tensor& x);
}  // namespace host

namespace {

constexpr int kThreads = 128;
constexpr int kMaxGroup = 8;       // query heads per kv head handled by one CTA (larger: Triton)
constexpr int kChunkAlign = 128;   // split sizes are multiples of every tile size
constexpr int kMinChunk = 256;     // a split's fixed cost stays small next to its reads
constexpr int kMaxSplits = 128;
constexpr int kCtasPerSm = 8;      // CTAs wanted per SM when every head is full

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* lengths;
  float* part_o;    // [B * Hq, splits, D] normalised partial outputs
  float* part_lse;  // [B * Hq, splits] log2-domain LSE of each split's keys
  void* out;        // [B, Hq, 1, D] contiguous
  int64_t q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, len_sb, len_sh;
  int Hkv, group, D, chunk, splits;
  float scale_log2;
};

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ uint4 load16(const T* p, bool valid) {
  return valid ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
}

// GP: the group padded to a power of two; TPK: threads per key row (TPK * 16 bytes >= D * sizeof(T)).
template <typename T, int TPK, int GP>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  constexpr int VEC = 16 / sizeof(T), KPP = kThreads / TPK;
  constexpr int KPT = GP >= 8 ? 4 : 8;  // keys per thread per tile: fewer for big groups (registers)
  constexpr int KT = KPP * KPT;         // keys per tile
  static_assert(kChunkAlign % KT == 0, "a split holds whole tiles");
  __shared__ float s_p[GP][KT];  // logits, then probabilities, of the tile
  __shared__ float s_alpha[GP];
  __shared__ float s_out[GP][TPK * VEC];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bg = blockIdx.x, split = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int length = p.lengths[b * p.len_sb + g * p.len_sh];
  const int start = split * p.chunk, end = min(start + p.chunk, length);
  if (start >= end) return;  // the whole CTA: past this head's length (the merge skips the split)

  const int kg = tid / TPK, lk = tid % TPK, d0 = lk * VEC;
  const bool has_cols = d0 < p.D;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + g * p.k_sh + d0;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + g * p.v_sh + d0;

  float q[GP][VEC];  // this thread's slice of every query row of the group, scaled to log2
#pragma unroll
  for (int r = 0; r < GP; ++r) {
    const bool ok = r < p.group && has_cols;
    const T* qr = static_cast<const T*>(p.q) + b * p.q_sb + (g * p.group + (ok ? r : 0)) * p.q_sh + d0;
    unpack16<T>(load16(qr, ok), q[r]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q[r][i] *= p.scale_log2;
  }
  float acc[GP][VEC] = {};
  float m_run = -INFINITY, l_run = 0.f;  // held by thread r < GP for query row r

  for (int t0 = start; t0 < end; t0 += KT) {
    uint4 kr[KPT], vr[KPT];  // every load of the tile in flight before any use
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int j = t0 + kg + i * KPP;
      kr[i] = load16(k + static_cast<int64_t>(j) * p.k_sn, j < end && has_cols);
      vr[i] = load16(v + static_cast<int64_t>(j) * p.v_sn, j < end && has_cols);
    }
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int jj = kg + i * KPP;
      float kf[VEC];
      unpack16<T>(kr[i], kf);
#pragma unroll
      for (int r = 0; r < GP; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot += q[r][e] * kf[e];
#pragma unroll
        for (int o = TPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (lk == 0) s_p[r][jj] = t0 + jj < end ? dot : -INFINITY;
      }
    }
    __syncthreads();
    // Online softmax over tiles: a warp per query row (rows past the group are computed, unused).
    for (int r = warp; r < GP; r += kThreads / 32) {
      float m = -INFINITY;
      for (int jj = lane; jj < KT; jj += 32) m = fmaxf(m, s_p[r][jj]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      // Every tile holds a key below `end`, so m is finite.
      const float m_old = __shfl_sync(0xffffffffu, m_run, r), m_new = fmaxf(m_old, m);
      float s = 0.f;
      for (int jj = lane; jj < KT; jj += 32) s += (s_p[r][jj] = exp2_approx(s_p[r][jj] - m_new));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      const float alpha = exp2_approx(m_old - m_new);  // 0 on the first tile (m_old = -inf)
      if (lane == r) {  // the running statistics of row r live in lane r of the warp that owns r
        m_run = m_new;
        l_run = l_run * alpha + s;
      }
      if (lane == 0) s_alpha[r] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < GP; ++r) {
      const float alpha = s_alpha[r];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][e] *= alpha;
    }
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int jj = kg + i * KPP;
      float vf[VEC];
      unpack16<T>(vr[i], vf);
#pragma unroll
      for (int r = 0; r < GP; ++r) {
        const float pr = s_p[r][jj];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] += pr * vf[e];
      }
    }
    __syncthreads();  // s_p and s_alpha are rewritten by the next tile
  }

  // Sum the key groups' accumulators in a fixed order (deterministic), then normalise.
  for (int i = tid; i < GP * TPK * VEC; i += kThreads) (&s_out[0][0])[i] = 0.f;
  __syncthreads();
  for (int turn = 0; turn < KPP; ++turn) {
    if (kg == turn) {
#pragma unroll
      for (int r = 0; r < GP; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s_out[r][d0 + e] += acc[r][e];
    }
    __syncthreads();
  }
  for (int r = warp; r < p.group; r += kThreads / 32) {
    const float l = __shfl_sync(0xffffffffu, l_run, r), m = __shfl_sync(0xffffffffu, m_run, r);
    const int64_t row = (static_cast<int64_t>(b) * p.Hkv * p.group + g * p.group + r) * p.splits + split;
    for (int d = lane; d < p.D; d += 32) p.part_o[row * p.D + d] = s_out[r][d] / l;
    if (lane == 0) p.part_lse[row] = m + log2f(l);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeParams p) {
  const int bh = blockIdx.x, Hq = p.Hkv * p.group, b = bh / Hq, h = bh % Hq;
  const int length = p.lengths[b * p.len_sb + (h / p.group) * p.len_sh];
  const int used = (length + p.chunk - 1) / p.chunk;  // the splits the split kernel wrote
  const float* lse = p.part_lse + static_cast<int64_t>(bh) * p.splits;
  float m = -INFINITY;
  for (int s = 0; s < used; ++s) m = fmaxf(m, lse[s]);
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(bh) * p.D;
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < used; ++s) {
      const float w = exp2_approx(lse[s] - m);
      num += w * p.part_o[(static_cast<int64_t>(bh) * p.splits + s) * p.D + d];
      den += w;
    }
    out[d] = from_float<T>(used ? num / den : 0.f);  // length 0: zeros
  }
}

template <typename T, int TPK>
void launch_split(const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  const int gp = p.group <= 1 ? 1 : p.group <= 2 ? 2 : p.group <= 4 ? 4 : 8;
  switch (gp) {
    case 1: decode_split_kernel<T, TPK, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: decode_split_kernel<T, TPK, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: decode_split_kernel<T, TPK, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: decode_split_kernel<T, TPK, 8><<<grid, kThreads, 0, stream>>>(p); break;
  }
}

template <typename T>
void launch(const DecodeParams& p, dim3 grid, int B_Hq, cudaStream_t stream) {
  const int pieces = p.D * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces of a row
  if (pieces <= 8) launch_split<T, 8>(p, grid, stream);
  else if (pieces <= 16) launch_split<T, 16>(p, grid, stream);
  else launch_split<T, 32>(p, grid, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_merge_kernel<T><<<B_Hq, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& lengths, double scale) {
  constexpr const char* op = "decode_attention";
  TORCH_CHECK(q_in.is_cuda() && q_in.dim() == 4 && q_in.size(2) == 1, op,
              ": q must be a CUDA [B, Hq, 1, D] tensor, got ", q_in.sizes(), " on ", q_in.device());
  for (const auto* t : {&k_in, &v_in})
    TORCH_CHECK(t->device() == q_in.device() && t->scalar_type() == q_in.scalar_type() && t->dim() == 4 &&
                    t->sizes() == k_in.sizes(),
                op, ": k_cache and v_cache must be [B, Hkv, L_cap, D] tensors of q's dtype on q's device");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(3), Hkv = k_in.size(1), cap = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, op,
              ": k_cache ", k_in.sizes(), " must match q ", q_in.sizes(), " with at most ", kMaxGroup,
              " query heads per kv head");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= kMaxHeadDim, op, ": head dim must be a multiple of 8 up to ",
              kMaxHeadDim, ", got ", D);
  TORCH_CHECK(lengths.device() == q_in.device() && lengths.scalar_type() == at::kInt && lengths.dim() == 2 &&
                  lengths.size(0) == B && lengths.size(1) == Hkv,
              op, ": lengths must be int32 [B, Hkv] on q's device, got ", lengths.scalar_type(), " ",
              lengths.sizes());
  TORCH_CHECK(B * Hkv < std::numeric_limits<int>::max() && cap < std::numeric_limits<int>::max(), op,
              ": B * Hkv and L_cap must fit in int32");
  // Lengths are not range-checked here (that would sync): the public function checks them.

  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({B, Hq, 1, D}, q_in.options());
  if (out.numel() == 0 || cap == 0) return out.zero_();
  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor v = host::ready_for_16B_loads(v_in);

  const int sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (int64_t{kCtasPerSm} * sms + B * Hkv - 1) / (B * Hkv));
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>((cap + kMinChunk - 1) / kMinChunk, kMaxSplits));
  const int64_t per_split = (cap + std::min(want, most) - 1) / std::min(want, most);
  const int64_t chunk = (per_split + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int64_t splits = (cap + chunk - 1) / chunk;
  at::Tensor part_o = at::empty({B * Hq * splits, D}, q.options().dtype(at::kFloat));
  at::Tensor part_lse = at::empty({B * Hq * splits}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.lengths = lengths.data_ptr<int32_t>();
  p.part_o = part_o.data_ptr<float>(), p.part_lse = part_lse.data_ptr<float>(), p.out = out.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  p.len_sb = lengths.stride(0), p.len_sh = lengths.stride(1);
  p.Hkv = static_cast<int>(Hkv), p.group = static_cast<int>(Hq / Hkv), p.D = static_cast<int>(D);
  p.chunk = static_cast<int>(chunk), p.splits = static_cast<int>(splits);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const dim3 grid(static_cast<unsigned>(B * Hkv), static_cast<unsigned>(splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int B_Hq = static_cast<int>(B * Hq);
  if (dtype == at::kFloat) launch<float>(p, grid, B_Hq, stream);
  else if (dtype == at::kHalf) launch<__half>(p, grid, B_Hq, stream);
  else launch<__nv_bfloat16>(p, grid, B_Hq, stream);
  return out;
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) { m.impl("decode_attention", &vtattn::decode_attention_cuda); }
