// The CUDA side of what the msa kernels use beyond plain CUDA C++: the half/bfloat16 headers, the
// dynamic shared-memory declaration, 16-byte asynchronous copies (cp.async), ldmatrix and the m16n8k16
// tensor-core product (mma.sync), all sm_80 and newer; warp shuffles are CUDA's own __shfl_xor_sync.
// tests/cuda_emulation/cuda_emulation.h provides the same names on the CPU, so mscmat_tiles.cuh and
// mscmat_kernels.cuh compile unchanged in both places.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#define MSA_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]

// cp.async, ldmatrix and bfloat16 mma.sync exist from sm_80 on; the kernels trap on older devices (and the
// launcher refuses them), so older device passes only need these to compile.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MSA_HAS_SM80 1
#endif

namespace msa {

// Starts copying src_bytes (16, or 0 to only zero-fill) from global src to shared dst and zero-fills the rest of
// the 16 bytes. Both addresses 16-byte aligned. The copy lands at a later cp_async_wait<N>() that covers its
// group. .cg keeps the line in L2 only: every tile is reused through shared memory, not through L1.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#ifdef MSA_HAS_SM80
  const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}

// Closes the group of copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef MSA_HAS_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (groups complete in order).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MSA_HAS_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory: lanes 8j .. 8j + 7 give the addresses of rows 0..7 of
// matrix j (16 bytes each, 16-byte aligned); lane l receives in r[j] the elements (l / 4, 2 (l % 4)) and
// (l / 4, 2 (l % 4) + 1) of matrix j, the first in the low half.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef MSA_HAS_SM80
  const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address));
#endif
}

// The same four matrices transposed: lane l receives in r[j] the elements (2 (l % 4), l / 4) and
// (2 (l % 4) + 1, l / 4) of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef MSA_HAS_SM80
  const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address));
#endif
}

// d += A B for one 16x16 (A, row-major) by 16x8 (B, column-major) tile of half or bfloat16, float32 accumulation.
// Lane l, g = l / 4, t = l % 4 holds a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]} and b = {B[2t..][g],
// B[2t+8..][g]} (pairs of elements, the first in the low half), and d = {D[g][2t], D[g][2t+1], D[g+8][2t],
// D[g+8][2t+1]}: the layouts ldmatrix_x4 produces from row-major A and from B stored as rows of B^T.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MSA_HAS_SM80
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

}  // namespace msa
