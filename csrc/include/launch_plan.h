// Launch plans: the grid, block and shared memory each CUDA launcher uses, and the inputs it
// refuses, computed in one torch-free, CUDA-free place. The launchers (csrc/cuda/) launch what a
// plan says; `python -m vtattn.check_launches` compiles this header on the host (csrc/check/) and
// checks the same plans against the limits of sm_80 .. sm_90, with each kernel's static shared
// memory and registers from ptxas: the check cannot drift from the code.
#pragma once

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace vtattn {
namespace plan {

constexpr int64_t kDefaultSmem = 48 * 1024;  // a block's static + dynamic shared memory without opt-in
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;
constexpr int64_t kInt32Max = 2147483647;

// What a plan depends on about the device (cudaDeviceProp: sharedMemPerBlockOptin, multiProcessorCount).
struct Device {
  int64_t smem_optin;
  int64_t sms;
};

// One kernel launch. `kernel` is the __global__ function's name (its instantiations share the
// plan); opt_in: raise the kernel's dynamic shared-memory limit to dyn_smem before launching.
struct Launch {
  const char* kernel;
  int64_t grid[3];
  int64_t block;
  int64_t dyn_smem;
  bool opt_in;
};

// Static + dynamic shared memory above the default 48 KiB is an "invalid argument" at launch
// unless cudaFuncSetAttribute raised the dynamic limit first: the static part counts too.
inline bool needs_opt_in(int64_t static_smem, int64_t dyn_smem) { return static_smem + dyn_smem > kDefaultSmem; }

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The launches of one call in order, or the reason the launcher refuses the inputs.
struct Plan {
  static constexpr int kMaxLaunches = 3;
  int n = 0;
  Launch launch[kMaxLaunches] = {};
  char error[240] = "";

  bool ok() const { return error[0] == '\0'; }
  Plan& add(const char* kernel, int64_t gx, int64_t gy, int64_t gz, int64_t block, int64_t dyn_smem, bool opt_in) {
    if (n < kMaxLaunches) launch[n++] = Launch{kernel, {gx, gy, gz}, block, dyn_smem, opt_in};
    return *this;
  }
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  Plan& fail(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(error, sizeof(error), fmt, args);
    va_end(args);
    n = 0;
    return *this;
  }
};

// ---- select_tokens, gather_tokens, merge_tokens (csrc/cuda/{select,gather,merge}_tokens.cu) ----

constexpr int kSelectThreads = 256;
constexpr int kMaxSegments = kSelectThreads;  // one thread per segment sums the budgets
constexpr int kMaxSegmentLen = 16384;         // 8 bytes of shared memory per token (key, kept list)
// Upper bound of select_kernel's static shared memory (cub temp storage, the histogram): ptxas
// reports 3376 bytes (CUDA 13.0, sm_80 and sm_90a); check_launches fails if it ever exceeds this.
constexpr int64_t kSelectStaticSmem = 4096;

inline Plan select_tokens(const Device& d, int64_t B, int64_t S, int64_t longest) {
  Plan p;
  if (S < 1 || S > kMaxSegments)
    return p.fail("the CUDA kernel takes 1 to %d segments, got %lld", kMaxSegments, (long long)S);
  if (B > kMaxGridYZ) return p.fail("the CUDA kernel takes B <= %lld, got %lld", (long long)kMaxGridYZ, (long long)B);
  if (longest < 0 || longest > kMaxSegmentLen)
    return p.fail("the CUDA kernel takes segments of 0 to %d tokens, got %lld", kMaxSegmentLen, (long long)longest);
  const int64_t dyn = 8 * longest;  // keys[L], then the kept list[L]
  if (kSelectStaticSmem + dyn > d.smem_optin)
    return p.fail("a segment of %lld tokens needs %lld bytes of shared memory per block, the device allows %lld",
                  (long long)longest, (long long)(kSelectStaticSmem + dyn), (long long)d.smem_optin);
  if (B == 0) return p;
  return p.add("select_kernel", S, B, 1, kSelectThreads, dyn, needs_opt_in(kSelectStaticSmem, dyn));
}

// Largest segment select_tokens runs on a device (what _cuda_caps accepts).
inline int64_t select_max_segment(const Device& d) {
  return std::min<int64_t>(kMaxSegmentLen, std::max<int64_t>(0, (d.smem_optin - kSelectStaticSmem) / 8));
}

constexpr int kGatherWarps = 4;  // one warp per output row

inline Plan gather_tokens(int64_t rows, int64_t C) {
  Plan p;
  if (cdiv(rows, kGatherWarps) > kMaxGridX)
    return p.fail("the CUDA kernel copies at most %lld rows, got %lld", (long long)(kMaxGridX * kGatherWarps),
                  (long long)rows);
  if (rows == 0 || C == 0) return p;
  return p.add("gather_kernel", cdiv(rows, kGatherWarps), 1, 1, kGatherWarps * 32, 0, false);
}

constexpr int kMergeTile = 64;  // tokens x kept tokens per similarity tile
constexpr int kAssignThreads = 256;
constexpr int kReduceThreads = 128;
constexpr int kReduceVec = 8;  // channels per thread: a block covers 1024 channels of one kept slot

inline Plan merge_tokens(int64_t B, int64_t N, int64_t C, int64_t K) {
  Plan p;
  if (B > kMaxGridYZ) return p.fail("the CUDA kernels take B <= %lld, got %lld", (long long)kMaxGridYZ, (long long)B);
  if (std::max(N, K) >= kInt32Max) return p.fail("the CUDA kernels need N and K that fit in int32");
  const int64_t channel_blocks = cdiv(C, kReduceThreads * kReduceVec);
  if (channel_blocks > kMaxGridYZ) return p.fail("too many channels for the CUDA kernel: %lld", (long long)C);
  if (B == 0 || K == 0 || C == 0) return p;  // an empty output: nothing to launch
  if (N > 0) p.add("merge_assign_kernel", cdiv(N, kMergeTile), B, 1, kAssignThreads, 0, false);
  return p.add("merge_reduce_kernel", K, B, channel_blocks, kReduceThreads, 0, false);
}

// ---- decode_attention, paged_decode_attention (csrc/cuda/decode_attention.cu) ----

constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxGroup = 8;  // query heads per kv head held in one CTA's registers
constexpr int kDecodeChunkAlign = 128;  // split sizes are multiples of every tile size
constexpr int kDecodeMinChunk = 256;    // a split's fixed cost stays small next to its reads
constexpr int kDecodeMaxSplits = 128;
constexpr int kDecodeCtasPerSm = 8;     // CTAs wanted per SM when every head is full

struct DecodePlan : Plan {
  int64_t chunk = 0, splits = 0;  // keys per split (whole tiles) and the splits of each head
};

// The split count depends on shapes and the SM count only, never on lengths (no host sync).
inline DecodePlan decode_attention(const Device& d, int64_t B, int64_t Hq, int64_t Hkv, int64_t cap, int64_t D) {
  DecodePlan p;
  if (Hkv <= 0 || Hq % Hkv != 0 || Hq / Hkv > kDecodeMaxGroup) {
    p.fail("q's %lld heads must be a multiple of %lld kv heads, with at most %d query heads per kv head",
           (long long)Hq, (long long)Hkv, kDecodeMaxGroup);
    return p;
  }
  if (D <= 0 || D % 8 != 0 || D > 128) {
    p.fail("head dim must be a multiple of 8 up to 128, got %lld", (long long)D);
    return p;
  }
  // The merge kernel runs a CTA per query head: B * Hq on grid x, and int32 head indices.
  if (B * Hq >= kInt32Max || cap >= kInt32Max) {
    p.fail("B * Hq and the cache capacity must fit in int32, got %lld and %lld", (long long)(B * Hq), (long long)cap);
    return p;
  }
  if (B * Hq == 0 || cap == 0) return p;
  const int64_t heads = B * Hkv;
  const int64_t want = std::max<int64_t>(1, cdiv(int64_t{kDecodeCtasPerSm} * d.sms, heads));
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(cdiv(cap, kDecodeMinChunk), kDecodeMaxSplits));
  p.chunk = cdiv(cdiv(cap, std::min(want, most)), kDecodeChunkAlign) * kDecodeChunkAlign;
  p.splits = cdiv(cap, p.chunk);
  p.add("decode_split_kernel", heads, p.splits, 1, kDecodeThreads, 0, false);
  p.add("decode_merge_kernel", B * Hq, 1, 1, kDecodeThreads, 0, false);
  return p;
}

// ---- paged_append (csrc/cuda/paged_append.cu) ----

constexpr int kAppendThreads = 64;  // a CTA per (batch, head): its n rows of k and v, then its counters

inline Plan paged_append(int64_t heads, int64_t n) {
  Plan p;
  if (heads > kMaxGridX)
    return p.fail("the CUDA kernel takes at most %lld heads (B * H), got %lld", (long long)kMaxGridX, (long long)heads);
  if (heads == 0 || n == 0) return p;
  return p.add("paged_append_kernel", heads, 1, 1, kAppendThreads, 0, false);
}

// ---- the flash kernel (csrc/include/flash_fwd.cuh): attention, varlen_attention, index_attention,
// and key_importance's row LSE ----

constexpr int kFlashBM = 128, kFlashBN = 64;  // query rows per CTA, keys per tile (FlashCfg)

// Head dim padded to the instantiated tile width (64, 80, 128), 0 when unsupported.
constexpr int flash_padded_dim(int64_t D) {
  return D <= 0 || D % 8 != 0 || D > 128 ? 0 : D <= 64 ? 64 : D <= 80 ? 80 : 128;
}
constexpr int flash_threads(int dp) { return (dp == 128 ? 8 : 4) * 32; }

// Dynamic shared memory: a Q tile and two stages of K (and V unless LSE only) tiles of rows padded
// by 8 elements, plus the Tile policy's extra bytes (index_attention: key positions).
constexpr int64_t flash_smem(int dp, int64_t esize, bool lse_only, int64_t extra) {
  return (kFlashBM + (lse_only ? 2 : 4) * kFlashBN) * (dp + 8) * esize + extra;
}

// `rows` query rows (per head and problem) on grid x in tiles of kFlashBM, `heads` on y, `problems`
// (batch, sequences) on z.
inline Plan flash(const Device& d, int64_t rows, int64_t heads, int64_t problems, int64_t D, int64_t esize,
                  bool lse_only, int64_t extra) {
  Plan p;
  const int dp = flash_padded_dim(D);
  if (dp == 0) return p.fail("head dim must be a multiple of 8 up to 128, got %lld", (long long)D);
  if (heads > kMaxGridYZ || problems > kMaxGridYZ)
    return p.fail("query heads and batch (sequences) must be <= %lld, got %lld and %lld", (long long)kMaxGridYZ,
                  (long long)heads, (long long)problems);
  if (rows >= kInt32Max) return p.fail("sequence lengths must fit in int32, got %lld rows", (long long)rows);
  const int64_t smem = flash_smem(dp, esize, lse_only, extra);
  if (smem > d.smem_optin)
    return p.fail("the flash kernel needs %lld bytes of shared memory per block at head dim %lld, the device allows "
                  "%lld", (long long)smem, (long long)D, (long long)d.smem_optin);
  if (rows == 0 || heads == 0 || problems == 0) return p;
  return p.add("flash_fwd_kernel", cdiv(rows, kFlashBM), heads, problems, flash_threads(dp), smem,
               needs_opt_in(0, smem));  // all its shared memory is dynamic
}

// ---- block_sparse_attention (csrc/cuda/block_sparse_attention.cu): the flash kernel over listed
// key blocks (BlockSparseTile): a CTA's rows must lie in one query block ----

inline Plan block_sparse_attention(const Device& d, int64_t Nq, int64_t Nk, int64_t heads, int64_t batch, int64_t D,
                                   int64_t esize, int64_t block_size) {
  Plan p;
  if (block_size <= 0 || block_size % kFlashBM != 0)  // kFlashBM is a multiple of kFlashBN
    return p.fail("the CUDA kernel needs a block_size that is a multiple of %d, got %lld", kFlashBM,
                  (long long)block_size);
  if (cdiv(Nk, block_size) * block_size >= kInt32Max - 2048)  // key slots and positions are int
    return p.fail("the CUDA kernel needs K_blocks * block_size below 2^31 - 2048, got Nk = %lld", (long long)Nk);
  return flash(d, Nq, heads, batch, D, esize, false, 0);
}

// ---- key_importance (csrc/cuda/key_importance.cu) ----

constexpr int kFewRows = 16;  // at most this many rows take the few-rows path
constexpr int kFewThreads = 128, kFewKeysPerThread = 8;
constexpr int kFinishThreads = 256, kFinishKeys = 1024;
constexpr int kColWarps = 4, kColKeys = 16 * 2 * kColWarps;  // keys per column CTA (MT = 2)

// Keys per few-rows CTA: TPK threads share a key row of D elements of `esize` bytes (16 each).
constexpr int few_rows_chunk_keys(int64_t D, int64_t esize) {
  const int64_t pieces = D * esize / 16;
  const int tpk = pieces <= 8 ? 8 : pieces <= 16 ? 16 : 32;
  return kFewThreads / tpk * kFewKeysPerThread;
}

// R rows (R <= kFewRows: the few-rows path, any dtype; else the column kernel after the flash
// kernel's LSE of the rows unless `has_lse`).
inline Plan key_importance(const Device& d, int64_t B, int64_t Hq, int64_t Nk, int64_t R, int64_t D, int64_t esize,
                           bool has_lse) {
  Plan p;
  if (B * Hq >= kInt32Max) return p.fail("B * Hq must fit in int32, got %lld", (long long)(B * Hq));
  if (R <= kFewRows) {
    const int64_t chunks = cdiv(Nk, few_rows_chunk_keys(D, esize));
    if (chunks > kMaxGridYZ) return p.fail("Nk = %lld is too long for the few-rows kernel", (long long)Nk);
    if (B * Hq == 0 || Nk == 0 || R == 0) return p;
    p.add("few_rows_logits_kernel", B * Hq, chunks, 1, kFewThreads, 0, false);
    return p.add("few_rows_finish_kernel", B * Hq, cdiv(Nk, kFinishKeys), 1, kFinishThreads, 0, false);
  }
  if (esize == 4) return p.fail("float32 runs only for at most %d rows (got %lld)", kFewRows, (long long)R);
  if (!has_lse) {
    p = flash(d, R, Hq, B, D, esize, true, 0);
    if (!p.ok()) return p;
  }
  if (B * Hq == 0 || Nk == 0) return p;
  return p.add("key_colsum_kernel", cdiv(Nk, kColKeys), Hq, B, kColWarps * 32, 0, false);
}

#if defined(__CUDACC__)
// ---- the launchers' side ----

inline Device device_limits(const cudaDeviceProp& prop) {
  return Device{static_cast<int64_t>(prop.sharedMemPerBlockOptin), static_cast<int64_t>(prop.multiProcessorCount)};
}

inline dim3 grid_of(const Launch& l) {
  return dim3(static_cast<unsigned>(l.grid[0]), static_cast<unsigned>(l.grid[1]), static_cast<unsigned>(l.grid[2]));
}

// Launches `kernel` as `l` says on `stream` (the opt-in first when the plan asks for it). The
// caller checks the launch error (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename... Params, typename... Args>
cudaError_t launch(const Launch& l, void (*kernel)(Params...), cudaStream_t stream, Args&&... args) {
  if (l.opt_in) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.dyn_smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid_of(l), static_cast<unsigned>(l.block), static_cast<size_t>(l.dyn_smem), stream>>>(
      static_cast<Params>(args)...);
  return cudaSuccess;
}
#endif

}  // namespace plan
}  // namespace vtattn
