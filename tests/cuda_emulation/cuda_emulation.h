// Just enough of CUDA, cp.async, ldmatrix, mma.sync and warp shuffles to run the kernels of csrc/cuda
// (mscmat_tiles.cuh, mscmat_warp.cuh, mscmat_kernels.cuh) on a CPU, for machines without a GPU: the CPU
// counterpart of csrc/cuda/device_primitives.cuh.
//
// A block runs as one std::thread per CUDA thread; __syncthreads() is a std::barrier of the block, and the
// dynamic shared memory is one buffer per block. The warp collectives (ldmatrix_x4, ldmatrix_x4_trans,
// mma_16816, __shfl_xor_sync, __syncwarp) meet at a barrier of the warp: each lane publishes its registers (or
// row address), then computes its own result from the others' as the PTX ISA lays fragments out across lanes, so
// a wrong lane mapping in a kernel gives wrong numbers here too. Half and bfloat16 round like the GPU's
// (_Float16, and round-to-nearest-even to the upper 16 bits of a float); products accumulate in float32 in
// k order, which differs from the tensor cores' order only in rounding. cp_async_16 checks that both
// addresses are 16-byte aligned, reads the source at once and writes shared memory only when a
// cp_async_wait<N>() covers its group, so reading a tile before waiting for it sees stale data; a kernel that
// ends with copies still pending is reported. What this cannot show: races between lanes of a warp that the
// collectives' barriers order, the register or shared-memory budget, and speed.
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

struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

namespace cuda_emulation {
inline thread_local std::barrier<>* current_barrier = nullptr;
inline thread_local unsigned char* current_shared_memory = nullptr;

// What the 32 lanes of a warp publish for a collective: up to 8 32-bit registers each.
struct Warp {
  std::barrier<> barrier{32};
  uint32_t published[32][8] = {};
};
inline thread_local Warp* current_warp = nullptr;

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

namespace cuda_emulation {
inline unsigned lane() { return threadIdx.x % 32; }

// Publishes this lane's `count` registers and waits for the whole warp; then published(l, r) reads lane l's r-th.
inline void publish(const uint32_t* registers, int count) {
  std::memcpy(current_warp->published[lane()], registers, sizeof(uint32_t) * static_cast<size_t>(count));
  current_warp->barrier.arrive_and_wait();
}
inline uint32_t published(unsigned from_lane, int r) { return current_warp->published[from_lane][r]; }
// Ends a collective: no lane publishes the next one before every lane has read this one.
inline void finish_collective() { current_warp->barrier.arrive_and_wait(); }

template <typename T>
float half_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half h;
    std::memcpy(&h.value, &bits, sizeof(bits));
    return __half2float(h);
  } else {
    return __bfloat162float(__nv_bfloat16{bits});
  }
}

// Element `half` (0: low, 1: high) of a register holding two 16-bit values.
template <typename T>
float element(uint32_t word, int half) {
  return half_to_float<T>(static_cast<uint16_t>(half ? word >> 16 : word & 0xFFFFu));
}
}  // namespace cuda_emulation

inline void __syncwarp() { cuda_emulation::finish_collective(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  cuda_emulation::publish(&bits, 1);
  bits = cuda_emulation::published(cuda_emulation::lane() ^ static_cast<unsigned>(lane_mask), 0);
  cuda_emulation::finish_collective();
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

namespace cuda_emulation {
// ldmatrix's first half: every lane publishes its (16-byte aligned) row address.
inline void publish_row_address(const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix with a row not 16-byte aligned");
  const auto address = reinterpret_cast<uintptr_t>(row);
  const uint32_t halves[2] = {static_cast<uint32_t>(address), static_cast<uint32_t>(address >> 32)};
  publish(halves, 2);
}

// The row address lane `from` published.
inline const unsigned char* published_row(unsigned from) {
  return reinterpret_cast<const unsigned char*>(static_cast<uintptr_t>(published(from, 0)) |
                                                static_cast<uintptr_t>(published(from, 1)) << 32);
}
}  // namespace cuda_emulation

namespace msa {
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  cuda_emulation::publish_row_address(row);
  const unsigned l = cuda_emulation::lane();
  for (unsigned j = 0; j < 4; ++j) {
    // Row l / 4 of matrix j, given by lane 8 j + l / 4; its elements 2 (l % 4) and 2 (l % 4) + 1.
    std::memcpy(&r[j], cuda_emulation::published_row(8 * j + l / 4) + 4 * (l % 4), sizeof(uint32_t));
  }
  cuda_emulation::finish_collective();
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  cuda_emulation::publish_row_address(row);
  const unsigned l = cuda_emulation::lane();
  for (unsigned j = 0; j < 4; ++j) {
    // Element l / 4 of rows 2 (l % 4) and 2 (l % 4) + 1 of matrix j.
    uint16_t pair[2];
    for (unsigned e = 0; e < 2; ++e) {
      std::memcpy(&pair[e], cuda_emulation::published_row(8 * j + 2 * (l % 4) + e) + 2 * (l / 4), sizeof(uint16_t));
    }
    r[j] = static_cast<uint32_t>(pair[0]) | static_cast<uint32_t>(pair[1]) << 16;
  }
  cuda_emulation::finish_collective();
}

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t registers[6] = {a[0], a[1], a[2], a[3], b0, b1};
  cuda_emulation::publish(registers, 6);
  // A[row][k] and B[k][col] from the lanes that hold them (see device_primitives.cuh for the layout).
  const auto a_at = [](int row, int k) {
    const unsigned from = static_cast<unsigned>((row % 8) * 4 + (k % 8) / 2);
    return cuda_emulation::element<T>(cuda_emulation::published(from, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)), k % 2);
  };
  const auto b_at = [](int k, int col) {
    const unsigned from = static_cast<unsigned>(col * 4 + (k % 8) / 2);
    return cuda_emulation::element<T>(cuda_emulation::published(from, 4 + (k >= 8 ? 1 : 0)), k % 2);
  };
  const int g = static_cast<int>(cuda_emulation::lane() / 4), t = static_cast<int>(cuda_emulation::lane() % 4);
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    d[e] = sum;
  }
  cuda_emulation::finish_collective();
}
}  // namespace msa

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
      if (threads % 32 != 0) fail("blocks must be whole warps");
      std::vector<Warp> warps(threads / 32);
      std::vector<std::thread> workers;
      workers.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          current_barrier = &barrier;
          current_warp = &warps[t / 32];
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
