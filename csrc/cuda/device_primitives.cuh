// The CUDA side of what the msa kernels use beyond plain CUDA C++: the half/bfloat16 and WMMA headers, the
// dynamic shared-memory declaration and 16-byte asynchronous copies (cp.async, sm_80 and newer).
// tests/cuda_emulation/cuda_emulation.h provides the same names on the CPU, so mscmat_tiles.cuh and
// mscmat_kernels.cuh compile unchanged in both places.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#define MSA_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]

// cp.async exists from sm_80 on; the kernels trap on older devices (and the launcher refuses them), so older
// device passes only need these to compile.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MSA_HAS_CP_ASYNC 1
#endif

namespace msa {

// Starts copying src_bytes (16, or 0 to only zero-fill) from global src to shared dst and zero-fills the rest of
// the 16 bytes. Both addresses 16-byte aligned. The copy lands at a later cp_async_wait<N>() that covers its
// group. .cg keeps the line in L2 only: every tile is reused through shared memory, not through L1.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#ifdef MSA_HAS_CP_ASYNC
  const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}

// Closes the group of copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef MSA_HAS_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (groups complete in order).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MSA_HAS_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace msa
