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
// Nor are lengths or page ids range-checked here (that would sync): the kernels clamp them into the
// cache, so values the public checks would refuse (skipped under torch.compile and graph capture)
// stay memory-safe; valid ones are unchanged.
//
// paged_decode_attention is the same kernels with another key address mapping (PagedRows): the
// caches are page pools [num_pages, page_size, D] and key j of (b, g) is row j % page_size of page
// block_table[b, g, j / page_size], looked up per key (any page size; a tile may straddle pages).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "host_checks.h"
#include "launch_plan.h"
#include "launch_utils.cuh"
#include "mma_sm80.cuh"

namespace vtattn {
namespace {

// Threads, group limit and the split rule: csrc/include/launch_plan.h (plan::decode_attention).
constexpr int kThreads = plan::kDecodeThreads;
constexpr int kMaxGroup = plan::kDecodeMaxGroup;  // query heads per kv head handled by one CTA (larger: Triton)
constexpr int kChunkAlign = plan::kDecodeChunkAlign;  // split sizes are multiples of every tile size

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* lengths;
  const int32_t* table;  // paged: block_table [B, Hkv, max_pages]
  float* part_o;    // [B * Hq, splits, D] normalised partial outputs
  float* part_lse;  // [B * Hq, splits] log2-domain LSE of each split's keys
  void* out;        // [B, Hq, 1, D] contiguous
  int64_t q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, len_sb, len_sh, t_sb, t_sh, t_sp;
  int Hkv, group, D, chunk, splits, page;
  int cap;        // key slots per (b, g): L_cap, or max_pages * page_size
  int num_pages;  // paged: pages in the pools
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

// lengths[b, g] clamped to [0, cap]: both kernels must agree on it.
__device__ __forceinline__ int length_of(const DecodeParams& p, int b, int g) {
  return min(max(p.lengths[b * p.len_sb + g * p.len_sh], 0), p.cap);
}

// Where key j of (b, g) lives: element offsets of its K and V rows from the cache bases.
struct DenseRows {  // caches [B, Hkv, L_cap, D]
  int64_t k0, v0;
  __device__ DenseRows(const DecodeParams& p, int b, int g)
      : k0(b * p.k_sb + g * p.k_sh), v0(b * p.v_sb + g * p.v_sh) {}
  __device__ void at(const DecodeParams& p, int j, int64_t& ko, int64_t& vo) const {
    ko = k0 + j * p.k_sn, vo = v0 + j * p.v_sn;
  }
};

struct PagedRows {  // pools [num_pages, page_size, D]: k_sb / v_sb are the page strides
  const int32_t* table;
  __device__ PagedRows(const DecodeParams& p, int b, int g) : table(p.table + b * p.t_sb + g * p.t_sh) {}
  __device__ void at(const DecodeParams& p, int j, int64_t& ko, int64_t& vo) const {
    // An id outside the pool reads its nearest page (as the reference).
    const int64_t page = min(max(__ldg(table + (j / p.page) * p.t_sp), 0), p.num_pages - 1), slot = j % p.page;
    ko = page * p.k_sb + slot * p.k_sn, vo = page * p.v_sb + slot * p.v_sn;
  }
};

// GP: the group padded to a power of two; TPK: threads per key row (TPK * 16 bytes >= D * sizeof(T)).
template <typename T, int TPK, int GP, typename Rows>
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
  const int length = length_of(p, b, g);
  const int start = split * p.chunk, end = min(start + p.chunk, length);
  if (start >= end) return;  // the whole CTA: past this head's length (the merge skips the split)

  const int kg = tid / TPK, lk = tid % TPK, d0 = lk * VEC;
  const bool has_cols = d0 < p.D;
  const T* k = static_cast<const T*>(p.k) + d0;
  const T* v = static_cast<const T*>(p.v) + d0;
  const Rows rows(p, b, g);

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
      int64_t ko = 0, vo = 0;
      if (j < end) rows.at(p, j, ko, vo);  // keys past the length: no table entry read (may be -1)
      kr[i] = load16(k + ko, j < end && has_cols);
      vr[i] = load16(v + vo, j < end && has_cols);
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
  const int length = length_of(p, b, h / p.group);
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

template <typename T, int TPK, typename Rows>
void launch_split(const DecodeParams& p, const plan::Launch& l, cudaStream_t stream) {
  const int gp = p.group <= 1 ? 1 : p.group <= 2 ? 2 : p.group <= 4 ? 4 : 8;
  switch (gp) {
    case 1: C10_CUDA_CHECK(plan::launch(l, decode_split_kernel<T, TPK, 1, Rows>, stream, p)); break;
    case 2: C10_CUDA_CHECK(plan::launch(l, decode_split_kernel<T, TPK, 2, Rows>, stream, p)); break;
    case 4: C10_CUDA_CHECK(plan::launch(l, decode_split_kernel<T, TPK, 4, Rows>, stream, p)); break;
    default: C10_CUDA_CHECK(plan::launch(l, decode_split_kernel<T, TPK, 8, Rows>, stream, p)); break;
  }
}

template <typename T, typename Rows>
void launch(const DecodeParams& p, const plan::Plan& lp, cudaStream_t stream) {
  const int pieces = p.D * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces of a row
  if (pieces <= 8) launch_split<T, 8, Rows>(p, lp.launch[0], stream);
  else if (pieces <= 16) launch_split<T, 16, Rows>(p, lp.launch[0], stream);
  else launch_split<T, 32, Rows>(p, lp.launch[0], stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(plan::launch(lp.launch[1], decode_merge_kernel<T>, stream, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Checks shared by both layouts: q [B, Hq, 1, D] on CUDA, GQA group and head dim the kernel takes,
// lengths int32 [B, Hkv] on q's device. Lengths are not range-checked (that would sync): the kernels
// clamp them.
void check_decode(const char* op, const at::Tensor& q, const at::Tensor& lengths, int64_t Hkv) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && q.size(2) == 1, op, ": q must be a CUDA [B, Hq, 1, D] tensor, got ",
              q.sizes(), " on ", q.device());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, op, ": q's ", Hq, " heads must be a multiple of ",
              Hkv, " kv heads, with at most ", kMaxGroup, " query heads per kv head");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= kMaxHeadDim, op, ": head dim must be a multiple of 8 up to ",
              kMaxHeadDim, ", got ", D);
  TORCH_CHECK(lengths.device() == q.device() && lengths.scalar_type() == at::kInt && lengths.dim() == 2 &&
                  lengths.size(0) == B && lengths.size(1) == Hkv,
              op, ": lengths must be int32 [B, Hkv] on q's device, got ", lengths.scalar_type(), " ",
              lengths.sizes());
}

// Both layouts after their checks: `cap` key slots per (b, g); `table` undefined for dense caches
// [B, Hkv, L_cap, D], else block_table over pools [num_pages, page_size, D].
at::Tensor run_decode(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                      const at::Tensor& lengths, const at::Tensor& table, int64_t Hkv, int64_t cap, double scale) {
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(3);
  c10::cuda::CUDAGuard guard(q_in.device());
  const plan::DecodePlan lp =
      plan::decode_attention(plan::device_limits(*at::cuda::getCurrentDeviceProperties()), B, Hq, Hkv, cap, D);
  TORCH_CHECK(lp.ok(), "decode_attention: ", lp.error);
  at::Tensor out = at::empty({B, Hq, 1, D}, q_in.options());
  if (lp.n == 0 || k_in.numel() == 0) return out.zero_();  // no query head, no key slot or an empty pool
  const at::Tensor q = host::ready_for_16B_loads(q_in);
  const at::Tensor k = host::ready_for_16B_loads(k_in);
  const at::Tensor v = host::ready_for_16B_loads(v_in);

  const int64_t chunk = lp.chunk, splits = lp.splits;
  at::Tensor part_o = at::empty({B * Hq * splits, D}, q.options().dtype(at::kFloat));
  at::Tensor part_lse = at::empty({B * Hq * splits}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.lengths = lengths.data_ptr<int32_t>();
  p.part_o = part_o.data_ptr<float>(), p.part_lse = part_lse.data_ptr<float>(), p.out = out.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1);
  const bool paged = table.defined();
  if (paged) {  // the page stride takes the batch stride's place; the head stride is unused
    p.table = table.data_ptr<int32_t>();
    p.t_sb = table.stride(0), p.t_sh = table.stride(1), p.t_sp = table.stride(2);
    p.page = static_cast<int>(k.size(1));
    p.k_sb = k.stride(0), p.k_sn = k.stride(1), p.v_sb = v.stride(0), p.v_sn = v.stride(1);
  } else {
    p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
    p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  }
  p.len_sb = lengths.stride(0), p.len_sh = lengths.stride(1);
  p.Hkv = static_cast<int>(Hkv), p.group = static_cast<int>(Hq / Hkv), p.D = static_cast<int>(D);
  p.chunk = static_cast<int>(chunk), p.splits = static_cast<int>(splits);
  p.cap = static_cast<int>(cap);
  p.num_pages = static_cast<int>(std::min<int64_t>(k.size(0), std::numeric_limits<int>::max()));  // ids are int32
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = q.scalar_type();
  if (paged) {
    if (dtype == at::kFloat) launch<float, PagedRows>(p, lp, stream);
    else if (dtype == at::kHalf) launch<__half, PagedRows>(p, lp, stream);
    else launch<__nv_bfloat16, PagedRows>(p, lp, stream);
  } else {
    if (dtype == at::kFloat) launch<float, DenseRows>(p, lp, stream);
    else if (dtype == at::kHalf) launch<__half, DenseRows>(p, lp, stream);
    else launch<__nv_bfloat16, DenseRows>(p, lp, stream);
  }
  return out;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lengths, double scale) {
  constexpr const char* op = "decode_attention";
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == q.scalar_type() && t->dim() == 4 &&
                    t->sizes() == k.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
                op, ": k_cache and v_cache must be [B, Hkv, L_cap, D] tensors of q's dtype, batch and head dim "
                "on q's device, got ", k.sizes(), " and ", v.sizes());
  check_decode(op, q, lengths, k.size(1));
  return run_decode(q, k, v, lengths, at::Tensor(), k.size(1), k.size(2), scale);
}

at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                       const at::Tensor& block_table, const at::Tensor& lengths, double scale) {
  constexpr const char* op = "paged_decode_attention";
  for (const auto* t : {&k_pages, &v_pages})
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == q.scalar_type() && t->dim() == 3 &&
                    t->sizes() == k_pages.sizes() && k_pages.size(1) > 0 && k_pages.size(2) == q.size(-1),
                op, ": k_pages and v_pages must be [num_pages, page_size > 0, D] pools of q's dtype and head dim "
                "on q's device, got ", k_pages.sizes(), " and ", v_pages.sizes());
  TORCH_CHECK(block_table.device() == q.device() && block_table.scalar_type() == at::kInt &&
                  block_table.dim() == 3 && block_table.size(0) == q.size(0),
              op, ": block_table must be int32 [B, Hkv, max_pages] on q's device, got ", block_table.scalar_type(),
              " ", block_table.sizes());
  // Page ids are not range-checked here either (a sync): the kernels clamp them into the pool.
  check_decode(op, q, lengths, block_table.size(1));
  return run_decode(q, k_pages, v_pages, lengths, block_table, block_table.size(1),
                    block_table.size(2) * k_pages.size(1), scale);
}

}  // namespace
}  // namespace vtattn

TORCH_LIBRARY_IMPL(vtattn_C, CUDA, m) {
  m.impl("decode_attention", &vtattn::decode_attention_cuda);
  m.impl("paged_decode_attention", &vtattn::paged_decode_attention_cuda);
}
