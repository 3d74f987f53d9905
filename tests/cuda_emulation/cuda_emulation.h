// Just enough of CUDA, WMMA and cp.async to run the kernels of csrc/cuda (mscmat_tiles.cuh, mscmat_kernels.cuh)
// on a CPU, for machines without a GPU: the CPU counterpart of csrc/cuda/device_primitives.cuh.
//
// A block runs as one std::thread per CUDA thread; __syncthreads() is a std::barrier of the block, and the
// dynamic shared memory is one buffer per block. A WMMA fragment holds its whole 16x16 tile, kept by lane 0
// of its warp only: lane 0 loads, multiplies and stores, the other lanes skip (they would compute the same),
// which keeps the warp-collective semantics while doing the work once. Half and bfloat16 round like the GPU's
// (_Float16, and round-to-nearest-even to the upper 16 bits of a float). cp_async_16 checks that both
// addresses are 16-byte aligned, reads the source at once and writes shared memory only when a
// cp_async_wait<N>() covers its group, so reading a tile before waiting for it sees stale data; a kernel that
// ends with copies still pending is reported. What this cannot show: real races between lanes of a warp, the
// register or shared-memory budget, and speed.
#pragma once

#include <array>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define MSA_DYNAMIC_SHARED(name) unsigned char* name = cuda_emulation::current_shared_memory

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};

namespace cuda_emulation {
inline thread_local std::barrier<>* current_barrier = nullptr;
inline thread_local unsigned char* current_shared_memory = nullptr;

struct PendingCopy {
  void* dst;
  std::array<unsigned char, 16> bytes;
};
inline thread_local std::vector<PendingCopy> open_copies;                    // since the last commit
inline thread_local std::vector<std::vector<PendingCopy>> committed_copies;  // oldest group first

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}
}  // namespace cuda_emulation

namespace msa {
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    cuda_emulation::fail("cp.async with an address that is not 16-byte aligned");
  }
  if (src_bytes != 0 && src_bytes != 16) cuda_emulation::fail("cp.async source size other than 0 or 16");
  cuda_emulation::PendingCopy copy{dst, {}};
  std::memcpy(copy.bytes.data(), src, static_cast<size_t>(src_bytes));  // the rest stays zero
  cuda_emulation::open_copies.push_back(copy);
}

inline void cp_async_commit() {
  cuda_emulation::committed_copies.push_back(std::move(cuda_emulation::open_copies));
  cuda_emulation::open_copies.clear();
}

template <int N>
void cp_async_wait() {
  auto& groups = cuda_emulation::committed_copies;
  while (groups.size() > static_cast<size_t>(N)) {
    for (const auto& copy : groups.front()) std::memcpy(copy.dst, copy.bytes.data(), copy.bytes.size());
    groups.erase(groups.begin());
  }
}
}  // namespace msa

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

inline void __syncthreads() { cuda_emulation::current_barrier->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }

struct __half {
  _Float16 value;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half x) { return static_cast<float>(x.value); }
inline __half __float2half_rn(float x) { return __half{static_cast<_Float16>(x)}; }
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even (finite inputs)
  return __nv_bfloat16{static_cast<uint16_t>(bits >> 16)};
}

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows 16x16x16 tiles only");
  float x[16][16];  // the logical tile: rows x columns of A (M x K), B (K x N) or the accumulator (M x N)
};

inline bool lane_zero() { return threadIdx.x % 32 == 0; }
inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& frag, const T* ptr, unsigned ld) {
  if (!lane_zero()) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      frag.x[r][c] = as_float(std::is_same_v<Layout, col_major> ? ptr[c * ld + r] : ptr[r * ld + c]);
    }
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& frag, float value) {
  for (auto& row : frag.x) {
    for (float& v : row) v = value;
  }
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!lane_zero()) return;
  float out[16][16];
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      float sum = c.x[r][col];
      for (int k = 0; k < 16; ++k) sum += a.x[r][k] * b.x[k][col];
      out[r][col] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& frag, unsigned ld,
                              layout_t layout) {
  if (!lane_zero()) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_row_major ? ptr[r * ld + c] : ptr[c * ld + r]) = frag.x[r][c];
    }
  }
}
}  // namespace nvcuda::wmma

namespace cuda_emulation {
// kernel<<<grid, threads, shared_bytes>>>(args...), one block after the other.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, unsigned threads, size_t shared_bytes, Args... args) {
  std::vector<unsigned char> storage(shared_bytes + 128);
  auto* shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(storage.data()) + 127) / 128 * 128);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      // Garbage, not zeros, in shared memory: a kernel must not rely on it being cleared.
      for (size_t i = 0; i < shared_bytes; ++i) shared[i] = static_cast<unsigned char>(0xA5 ^ (i * 31));
      std::barrier<> barrier(threads);
      std::vector<std::thread> workers;
      workers.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          current_barrier = &barrier;
          current_shared_memory = shared;
          kernel(args...);
          bool pending = !open_copies.empty();
          for (const auto& group : committed_copies) pending = pending || !group.empty();
          if (pending) fail("the kernel ended with cp.async copies it never waited for");
          committed_copies.clear();
        });
      }
      for (auto& worker : workers) worker.join();
    }
  }
}
}  // namespace cuda_emulation
