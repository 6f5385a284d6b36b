// Torch-free tile helpers for the tensor-core kernels: cp.async tile loads into padded shared
// memory, and warp-level GEMMs whose stationary operand lives in registers.
//
// Shared tiles are [rows][STR] of T with STR = DP + 8: the 16 extra bytes per row shift
// consecutive rows by 4 banks, so the 8 row addresses of every ldmatrix phase hit distinct banks
// (for DP = 64, 80, 128). Columns D..DP-1 are zero-filled; columns DP..STR-1 are never read.
#pragma once

#include "mma_sm80.cuh"

namespace vtattn {

// Copies a ROWS x DP tile into `s` (row stride STR), 16 bytes per cp.async, spread over NT
// threads. row_ptr(r) gives the global address of tile row r (its D leading elements are read),
// or nullptr for a row that must be zeros. `fallback` is any valid global address (never read).
template <int ROWS, int DP, int STR, int NT, typename T, typename RowPtr>
__device__ __forceinline__ void load_tile_async(T* s, const RowPtr& row_ptr, int D, const T* fallback, int tid) {
  static_assert(sizeof(T) == 2 && DP % 8 == 0, "16-byte chunks of 8 half-precision elements");
  constexpr int CPR = DP / 8, TOTAL = ROWS * CPR, ITERS = (TOTAL + NT - 1) / NT;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int idx = tid + it * NT;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const int r = idx / CPR, c = idx % CPR;
      const T* src = row_ptr(r);
      const bool ok = src != nullptr && c * 8 < D;
      cp_async_16(s + r * STR + c * 8, ok ? src + c * 8 : fallback, ok);
    }
  }
}

// A fragment (16 x 16) of the row-major tile `s` at rows row0..row0+15, columns k0..k0+15.
// ldmatrix.x4: lanes 0-15 address rows 0-15 at column k0 (matrices a0, a1), lanes 16-31 the same
// rows at k0 + 8 (a2, a3).
template <int STR, typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* s, int row0, int k0, int lane) {
  ldmatrix_x4(a, s + (row0 + (lane & 15)) * STR + k0 + (lane >> 4) * 8);
}

// acc[mt][nb] += A[mt] (16 x DP) * B^T, where B is the NB*8 x DP row-major tile `sB` (rows = the
// output columns, e.g. keys for S = Q K^T) and a_frag(mt, ks, a) yields the A fragment of row
// block mt at k step ks (from registers or shared memory). One ldmatrix.x4 gives the B fragments
// of two 8-column blocks: lanes 0-7 rows 0-7 at k0 (b0 of block 0), 8-15 rows 0-7 at k0+8 (b1 of
// block 0), 16-23 rows 8-15 at k0 (b0 of block 1), 24-31 rows 8-15 at k0+8 (b1 of block 1).
// Each B fragment is loaded once and used for all MT row blocks of the warp.
template <int MT, int NB, int DP, int STR, typename T, typename AFrag>
__device__ __forceinline__ void gemm_a_bt(float (&acc)[MT][NB][4], const AFrag& a_frag, const T* sB, int lane) {
  static_assert(NB % 2 == 0, "B fragments come in pairs of 8-column blocks");
  const T* p = sB + ((lane & 7) + ((lane >> 4) << 3)) * STR + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < DP / 16; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a_frag(mt, ks, a[mt]);
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, p + np * 16 * STR + ks * 16);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[mt][db] += P[mt] (16 x BN, fp32 C fragments in `p`) * V (BN x DP row-major tile `sV`).
// The C fragments of key blocks 2kk and 2kk+1 are exactly the A fragment of the 16-key step kk
// once rounded to T. ldmatrix.x4.trans gives the B fragments of two 8-column d blocks: lanes 0-7
// keys 0-7 at d0 (b0 of block 0), 8-15 keys 8-15 at d0 (b1 of block 0), 16-23 keys 0-7 at d0+8,
// 24-31 keys 8-15 at d0+8 (block 1).
template <int MT, int BN, int DP, int STR, typename T>
__device__ __forceinline__ void gemm_p_v(float (&acc)[MT][DP / 8][4], const float (&p)[MT][BN / 8][4],
                                         const T* sV, int lane) {
  static_assert(DP % 16 == 0 && BN % 16 == 0, "16-wide k and paired d blocks");
  const T* ptr = sV + ((lane & 7) + (((lane >> 3) & 1) << 3)) * STR + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = pack2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      a[mt][1] = pack2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      a[mt][2] = pack2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      a[mt][3] = pack2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < DP / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, ptr + kk * 16 * STR + dp * 16);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * dp], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

}  // namespace vtattn
