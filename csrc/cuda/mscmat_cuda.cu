// CUDA kernels of msa::mscmat_scores, forward and backward (registered under the CUDA dispatch key).
//
//   scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
//   p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
//   r[i,j,h,l]  = <u[i,h], v[j,l,h]>
//
// Tiling: a block owns BI images and a chunk of BN "word slots". The slots hold BT = BN / LP texts of LP
// slots each (LP = the word count rounded up to a power of two >= 16, at most BN); texts longer than BN
// are walked in chunks of BN words with an online softmax. For each head the block stages Q_h, U_h
// [BI, Dh] and K_h, V_h [BN, Dh] in shared memory, computes S = Q K^T and R = U V^T (float32) into shared
// memory -- with WMMA tensor-core tiles for half and bfloat16, with plain FMAs for float32 -- and one thread
// per (image, text) pair runs the masked softmax and the weighted sum over the text's slots.
//
// Backward recomputes S and R and turns them into dS = g p (r - o) scale and dR = g p (o = sum_l p r per
// image, text and head). One kernel owns an image tile and a head and loops over all texts (dq = dS K,
// du = dR V); the other owns a word chunk of a text tile and a head and loops over all images
// (dk = dS^T Q, dv = dR^T U). Every gradient element is summed inside one block: no atomics, deterministic.
//
// Tensor cores need sm_80 or newer (bfloat16 WMMA); the launcher checks the device's capability.

#ifdef MSA_CUDA_EMULATION
// tests/cuda_emulation: the kernels below compiled for the CPU against a small emulation of CUDA and WMMA.
#include "cuda_emulation.h"
#else
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>
#define MSA_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cstdint>
#include <type_traits>

namespace msa {
namespace {

constexpr int kThreads = 128;  // 4 warps; with WMMA each warp owns 16 rows of a 64-row tile
constexpr int kMinSlotsPerText = 16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Tile sizes and the shared-memory layout of one block, shared by host (launch size) and device.
// Row pads keep WMMA pointers 32-byte aligned (multiples of 8 halves / 4 floats) and spread banks.
template <typename T, int DP>
struct Tiles {
  static constexpr bool kWmma = !std::is_same<T, float>::value;
  static constexpr int BI = kWmma ? 64 : 32;  // images per block
  static constexpr int BN = kWmma ? 64 : 32;  // word slots per block
  static constexpr int kMaxTexts = BN / kMinSlotsPerText;
  static constexpr int kPairs = BI * kMaxTexts;
  static constexpr int LDX = DP + (kWmma ? 8 : 1);  // rows of Q, U, K, V
  static constexpr int LDS = BN + 4;                 // rows of S, R (float)
  static constexpr int LDG = BN + (kWmma ? 8 : 1);   // rows of dS, dR
  // Offsets in bytes; every block starts on a 128-byte boundary.
  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t kQ = 0;
  static constexpr size_t kU = align(kQ + sizeof(T) * BI * LDX);
  static constexpr size_t kK = align(kU + sizeof(T) * BI * LDX);
  static constexpr size_t kV = align(kK + sizeof(T) * BN * LDX);
  static constexpr size_t kS = align(kV + sizeof(T) * BN * LDX);
  static constexpr size_t kR = align(kS + sizeof(float) * BI * LDS);
  static constexpr size_t kDS = align(kR + sizeof(float) * BI * LDS);
  static constexpr size_t kDR = align(kDS + sizeof(T) * BI * LDG);
  static constexpr size_t kKeep = align(kDR + sizeof(T) * BI * LDG);
  static constexpr size_t kStats = align(kKeep + sizeof(float) * BN);  // m, den, num, acc, grad per pair
  static constexpr size_t kAcc = align(kStats + sizeof(float) * 5 * kPairs);
  // float32 accumulators of the gradients when there are no tensor-core fragments to hold them
  static constexpr size_t kBytes = kAcc + (kWmma ? 0 : sizeof(float) * 2 * (BI > BN ? BI : BN) * DP);
};

struct Shape {
  int64_t num_images, num_texts, num_words, heads, head_dim;
  int64_t q_stride_i, q_stride_h;                  // q, u (and dq, du): [Ni, H, Dh], unit last stride
  int64_t k_stride_t, k_stride_l, k_stride_h;      // k, v (and dk, dv): [Nt, L, H, Dh], unit last stride
  int slots_per_text;                              // LP
  int texts_per_tile;                              // BT = BN / LP
  float scale;
};

template <typename T, int DP>
struct Smem {
  using C = Tiles<T, DP>;
  T *q, *u, *k, *v, *ds, *dr;
  float *s, *r, *keep, *m, *den, *num, *acc, *grad, *facc;
  __device__ explicit Smem(unsigned char* base)
      : q(reinterpret_cast<T*>(base + C::kQ)),
        u(reinterpret_cast<T*>(base + C::kU)),
        k(reinterpret_cast<T*>(base + C::kK)),
        v(reinterpret_cast<T*>(base + C::kV)),
        ds(reinterpret_cast<T*>(base + C::kDS)),
        dr(reinterpret_cast<T*>(base + C::kDR)),
        s(reinterpret_cast<float*>(base + C::kS)),
        r(reinterpret_cast<float*>(base + C::kR)),
        keep(reinterpret_cast<float*>(base + C::kKeep)),
        m(reinterpret_cast<float*>(base + C::kStats)),
        den(m + C::kPairs),
        num(m + 2 * C::kPairs),
        acc(m + 3 * C::kPairs),
        grad(m + 4 * C::kPairs),
        facc(reinterpret_cast<float*>(base + C::kAcc)) {}
};

// Rows [first, first + BI) of head h of q or u into shared memory, zero beyond Ni and Dh.
template <typename T, int DP>
__device__ void load_images(T* dst, const T* src, const Shape& p, int64_t first, int64_t h) {
  using C = Tiles<T, DP>;
  for (int e = threadIdx.x; e < C::BI * DP; e += kThreads) {
    const int row = e / DP, d = e % DP;
    const int64_t i = first + row;
    T value = from_float<T>(0.f);
    if (i < p.num_images && d < p.head_dim) value = src[i * p.q_stride_i + h * p.q_stride_h + d];
    dst[row * C::LDX + d] = value;
  }
}

// One chunk of word slots (texts [first_text, first_text + BT), words [w0, w0 + LP)) of head h of k and v
// into shared memory, with keep = 1 for a real, unmasked word and 0 for a masked or padding slot.
template <typename T, int DP>
__device__ void load_words(T* k_dst, T* v_dst, float* keep, const T* k, const T* v, const uint8_t* mask,
                           const Shape& p, int64_t first_text, int64_t w0, int64_t h) {
  using C = Tiles<T, DP>;
  for (int e = threadIdx.x; e < C::BN * DP; e += kThreads) {
    const int slot = e / DP, d = e % DP;
    const int64_t j = first_text + slot / p.slots_per_text, l = w0 + slot % p.slots_per_text;
    const bool real = slot < p.texts_per_tile * p.slots_per_text && j < p.num_texts && l < p.num_words;
    T kv = from_float<T>(0.f), vv = from_float<T>(0.f);
    if (real && d < p.head_dim) {
      const int64_t offset = j * p.k_stride_t + l * p.k_stride_l + h * p.k_stride_h + d;
      kv = k[offset];
      vv = v[offset];
    }
    k_dst[slot * C::LDX + d] = kv;
    v_dst[slot * C::LDX + d] = vv;
    if (d == 0) keep[slot] = (real && (mask == nullptr || mask[j * p.num_words + l] != 0)) ? 1.f : 0.f;
  }
}

// S = Q K^T and R = U V^T of the staged tiles, float32, into shared memory.
template <typename T, int DP>
__device__ void tile_products(const Smem<T, DP>& sm) {
  using C = Tiles<T, DP>;
  if constexpr (C::kWmma) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    constexpr int kCols = C::BN / 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag[kCols], r_frag[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      wmma::fill_fragment(s_frag[c], 0.f);
      wmma::fill_fragment(r_frag[c], 0.f);
    }
#pragma unroll
    for (int kk = 0; kk < DP; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag, u_frag;
      wmma::load_matrix_sync(q_frag, sm.q + warp * 16 * C::LDX + kk, C::LDX);
      wmma::load_matrix_sync(u_frag, sm.u + warp * 16 * C::LDX + kk, C::LDX);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        // K^T as a col-major [Dh, BN] matrix is K's row-major [BN, Dh] storage.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag, v_frag;
        wmma::load_matrix_sync(k_frag, sm.k + c * 16 * C::LDX + kk, C::LDX);
        wmma::load_matrix_sync(v_frag, sm.v + c * 16 * C::LDX + kk, C::LDX);
        wmma::mma_sync(s_frag[c], q_frag, k_frag, s_frag[c]);
        wmma::mma_sync(r_frag[c], u_frag, v_frag, r_frag[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      wmma::store_matrix_sync(sm.s + warp * 16 * C::LDS + c * 16, s_frag[c], C::LDS, wmma::mem_row_major);
      wmma::store_matrix_sync(sm.r + warp * 16 * C::LDS + c * 16, r_frag[c], C::LDS, wmma::mem_row_major);
    }
  } else {
    for (int e = threadIdx.x; e < C::BI * C::BN; e += kThreads) {
      const int i = e / C::BN, n = e % C::BN;
      float s = 0.f, r = 0.f;
#pragma unroll 8
      for (int d = 0; d < DP; ++d) {
        s += to_float(sm.q[i * C::LDX + d]) * to_float(sm.k[n * C::LDX + d]);
        r += to_float(sm.u[i * C::LDX + d]) * to_float(sm.v[n * C::LDX + d]);
      }
      sm.s[i * C::LDS + n] = s;
      sm.r[i * C::LDS + n] = r;
    }
  }
}

template <typename T, int DP>
__device__ void reset_stats(const Smem<T, DP>& sm) {
  using C = Tiles<T, DP>;
  for (int pair = threadIdx.x; pair < C::kPairs; pair += kThreads) {
    sm.m[pair] = -INFINITY;
    sm.den[pair] = 0.f;
    sm.num[pair] = 0.f;
  }
}

// Online-softmax update of every (image, text) pair with the slots of the staged chunk.
template <typename T, int DP>
__device__ void update_stats(const Smem<T, DP>& sm, const Shape& p) {
  using C = Tiles<T, DP>;
  const int LP = p.slots_per_text;
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const int i = pair / p.texts_per_tile, t = pair % p.texts_per_tile;
    const float* s = sm.s + i * C::LDS + t * LP;
    const float* r = sm.r + i * C::LDS + t * LP;
    const float* keep = sm.keep + t * LP;
    float chunk_max = -INFINITY;
    for (int l = 0; l < LP; ++l) {
      if (keep[l] != 0.f) chunk_max = fmaxf(chunk_max, s[l] * p.scale);
    }
    const float m_old = sm.m[pair];
    const float m_new = fmaxf(m_old, chunk_max);
    if (m_new == -INFINITY) continue;  // no valid word so far
    const float alpha = __expf(m_old - m_new);  // m_old = -inf gives 0
    float den = 0.f, num = 0.f;
    for (int l = 0; l < LP; ++l) {
      if (keep[l] != 0.f) {
        const float e = __expf(s[l] * p.scale - m_new);
        den += e;
        num += e * r[l];
      }
    }
    sm.m[pair] = m_new;
    sm.den[pair] = sm.den[pair] * alpha + den;
    sm.num[pair] = sm.num[pair] * alpha + num;
  }
}

// (m, den, num) -> (m, 1 / den, o = num / den) per pair; a text without a valid word gets 1 / den = 0.
template <typename T, int DP>
__device__ void finalize_stats(const Smem<T, DP>& sm, const Shape& p) {
  using C = Tiles<T, DP>;
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const float den = sm.den[pair];
    const float inv_den = den > 0.f ? 1.f / den : 0.f;
    sm.den[pair] = inv_den;
    sm.num[pair] = sm.num[pair] * inv_den;
  }
}

// dS = g p (r - o) scale and dR = g p of the staged chunk, into shared memory in T.
template <typename T, int DP>
__device__ void chunk_grads(const Smem<T, DP>& sm, const Shape& p) {
  using C = Tiles<T, DP>;
  const int LP = p.slots_per_text;
  for (int e = threadIdx.x; e < C::BI * C::BN; e += kThreads) {
    const int i = e / C::BN, n = e % C::BN;
    const int t = n / LP;
    float ds = 0.f, dr = 0.f;
    if (t < p.texts_per_tile && sm.keep[n] != 0.f) {
      const int pair = i * p.texts_per_tile + t;
      const float inv_den = sm.den[pair];
      if (inv_den > 0.f) {
        const float gp = sm.grad[pair] * __expf(sm.s[i * C::LDS + n] * p.scale - sm.m[pair]) * inv_den;
        dr = gp;
        ds = gp * (sm.r[i * C::LDS + n] - sm.num[pair]) * p.scale;
      }
    }
    sm.ds[i * C::LDG + n] = from_float<T>(ds);
    sm.dr[i * C::LDG + n] = from_float<T>(dr);
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) mscmat_scores_fwd_kernel(const T* __restrict__ q, const T* __restrict__ u,
                                                                     const T* __restrict__ k, const T* __restrict__ v,
                                                                     const uint8_t* __restrict__ mask, T* __restrict__ out,
                                                                     Shape p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the launcher refuses devices older than sm_80
#else
  using C = Tiles<T, DP>;
  MSA_DYNAMIC_SHARED(smem_raw);
  const Smem<T, DP> sm(smem_raw);
  // Image tiles vary fastest: consecutive blocks reuse the same text tile's k and v from L2.
  const int64_t image_tiles = (p.num_images + C::BI - 1) / C::BI;
  const int64_t first_image = (static_cast<int64_t>(blockIdx.x) % image_tiles) * C::BI;
  const int64_t first_text = (static_cast<int64_t>(blockIdx.x) / image_tiles) * p.texts_per_tile;
  for (int pair = threadIdx.x; pair < C::kPairs; pair += kThreads) sm.acc[pair] = 0.f;
  for (int64_t h = 0; h < p.heads; ++h) {
    load_images<T, DP>(sm.q, q, p, first_image, h);
    load_images<T, DP>(sm.u, u, p, first_image, h);
    reset_stats(sm);
    for (int64_t w0 = 0; w0 < p.num_words; w0 += p.slots_per_text) {
      load_words<T, DP>(sm.k, sm.v, sm.keep, k, v, mask, p, first_text, w0, h);
      __syncthreads();
      tile_products(sm);
      __syncthreads();
      update_stats(sm, p);
      __syncthreads();
    }
    for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
      const float den = sm.den[pair];
      if (den > 0.f) sm.acc[pair] += sm.num[pair] / den;
    }
  }
  __syncthreads();
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const int64_t i = first_image + pair / p.texts_per_tile, j = first_text + pair % p.texts_per_tile;
    if (i < p.num_images && j < p.num_texts) out[i * p.num_texts + j] = from_float<T>(sm.acc[pair]);
  }
#endif
}

// Statistics of every (image, text) pair of the tile over all the texts' words, for texts longer than one
// chunk (the single-chunk case computes them from the chunk it differentiates). Leaves the last chunk staged.
template <typename T, int DP>
__device__ void full_text_stats(const Smem<T, DP>& sm, const Shape& p, const T* k, const T* v, const uint8_t* mask,
                                int64_t first_text, int64_t h) {
  reset_stats(sm);
  __syncthreads();
  for (int64_t w0 = 0; w0 < p.num_words; w0 += p.slots_per_text) {
    load_words<T, DP>(sm.k, sm.v, sm.keep, k, v, mask, p, first_text, w0, h);
    __syncthreads();
    tile_products(sm);
    __syncthreads();
    update_stats(sm, p);
    __syncthreads();
  }
}

template <typename T, int DP>
__device__ void load_grad(const Smem<T, DP>& sm, const Shape& p, const float* grad, int64_t first_image,
                          int64_t first_text) {
  using C = Tiles<T, DP>;
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const int64_t i = first_image + pair / p.texts_per_tile, j = first_text + pair % p.texts_per_tile;
    sm.grad[pair] = (i < p.num_images && j < p.num_texts) ? grad[i * p.num_texts + j] : 0.f;
  }
}

// dq, du of one image tile (blockIdx.x) and one head (blockIdx.y).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) mscmat_scores_bwd_images_kernel(
    const T* __restrict__ q, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const uint8_t* __restrict__ mask, const float* __restrict__ grad, T* __restrict__ dq, T* __restrict__ du,
    Shape p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using C = Tiles<T, DP>;
  MSA_DYNAMIC_SHARED(smem_raw);
  const Smem<T, DP> sm(smem_raw);
  const int64_t first_image = static_cast<int64_t>(blockIdx.x) * C::BI;
  const int64_t h = blockIdx.y;
  const bool one_chunk = p.num_words <= p.slots_per_text;
  load_images<T, DP>(sm.q, q, p, first_image, h);
  load_images<T, DP>(sm.u, u, p, first_image, h);

  using namespace nvcuda;
  constexpr int kDCols = DP / 16;
  const int warp = threadIdx.x / 32;
  // With WMMA each warp keeps its 16 rows of dq and du in fragments; otherwise they live in sm.facc.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq_frag[C::kWmma ? kDCols : 1], du_frag[C::kWmma ? kDCols : 1];
  if constexpr (C::kWmma) {
#pragma unroll
    for (int c = 0; c < kDCols; ++c) {
      wmma::fill_fragment(dq_frag[c], 0.f);
      wmma::fill_fragment(du_frag[c], 0.f);
    }
  } else {
    for (int e = threadIdx.x; e < 2 * C::BI * DP; e += kThreads) sm.facc[e] = 0.f;
  }

  for (int64_t first_text = 0; first_text < p.num_texts; first_text += p.texts_per_tile) {
    __syncthreads();  // the previous tile's chunk is no longer read
    load_grad(sm, p, grad, first_image, first_text);
    if (!one_chunk) {
      full_text_stats(sm, p, k, v, mask, first_text, h);
      finalize_stats(sm, p);
    } else {
      reset_stats(sm);
    }
    for (int64_t w0 = 0; w0 < p.num_words; w0 += p.slots_per_text) {
      __syncthreads();
      load_words<T, DP>(sm.k, sm.v, sm.keep, k, v, mask, p, first_text, w0, h);
      __syncthreads();
      tile_products(sm);
      __syncthreads();
      if (one_chunk) {
        update_stats(sm, p);
        __syncthreads();
        finalize_stats(sm, p);
        __syncthreads();
      }
      chunk_grads(sm, p);
      __syncthreads();
      if constexpr (C::kWmma) {
#pragma unroll
        for (int kk = 0; kk < C::BN; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> ds_frag, dr_frag;
          wmma::load_matrix_sync(ds_frag, sm.ds + warp * 16 * C::LDG + kk, C::LDG);
          wmma::load_matrix_sync(dr_frag, sm.dr + warp * 16 * C::LDG + kk, C::LDG);
#pragma unroll
          for (int c = 0; c < kDCols; ++c) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> k_frag, v_frag;
            wmma::load_matrix_sync(k_frag, sm.k + kk * C::LDX + c * 16, C::LDX);
            wmma::load_matrix_sync(v_frag, sm.v + kk * C::LDX + c * 16, C::LDX);
            wmma::mma_sync(dq_frag[c], ds_frag, k_frag, dq_frag[c]);
            wmma::mma_sync(du_frag[c], dr_frag, v_frag, du_frag[c]);
          }
        }
      } else {
        for (int e = threadIdx.x; e < C::BI * DP; e += kThreads) {
          const int i = e / DP, d = e % DP;
          float gq = 0.f, gu = 0.f;
          for (int n = 0; n < C::BN; ++n) {
            gq += to_float(sm.ds[i * C::LDG + n]) * to_float(sm.k[n * C::LDX + d]);
            gu += to_float(sm.dr[i * C::LDG + n]) * to_float(sm.v[n * C::LDX + d]);
          }
          sm.facc[e] += gq;
          sm.facc[C::BI * DP + e] += gu;
        }
      }
    }
  }
  __syncthreads();
  // Through shared memory (S and R are free now) to global, skipping rows beyond Ni and columns beyond Dh.
  if constexpr (C::kWmma) {
    // A lambda per accumulator keeps the fragment indices compile-time (a run-time choice between dq_frag and
    // du_frag would move both arrays to local memory).
    const auto write_out = [&](auto& frags, T* dst, float* staging) {
      // The staging tile holds BI x BN floats: DP columns go through it BN at a time.
      for (int c0 = 0; c0 < DP; c0 += C::BN) {
#pragma unroll
        for (int c = 0; c < kDCols; ++c) {
          if (c * 16 >= c0 && c * 16 < c0 + C::BN) {
            wmma::store_matrix_sync(staging + warp * 16 * C::LDS + (c * 16 - c0), frags[c], C::LDS,
                                    wmma::mem_row_major);
          }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < C::BI * C::BN; e += kThreads) {
          const int row = e / C::BN, col = c0 + e % C::BN;
          const int64_t i = first_image + row;
          if (i < p.num_images && col < p.head_dim && col < DP) {
            dst[i * p.q_stride_i + h * p.q_stride_h + col] = from_float<T>(staging[row * C::LDS + (col - c0)]);
          }
        }
        __syncthreads();
      }
    };
    write_out(dq_frag, dq, sm.s);
    write_out(du_frag, du, sm.r);
  } else {
    for (int e = threadIdx.x; e < C::BI * DP; e += kThreads) {
      const int row = e / DP, col = e % DP;
      const int64_t i = first_image + row;
      if (i < p.num_images && col < p.head_dim) {
        dq[i * p.q_stride_i + h * p.q_stride_h + col] = from_float<T>(sm.facc[e]);
        du[i * p.q_stride_i + h * p.q_stride_h + col] = from_float<T>(sm.facc[C::BI * DP + e]);
      }
    }
  }
#endif
}

// dk, dv of one word chunk of one text tile (blockIdx.x = tile * chunks + chunk) and one head (blockIdx.y).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) mscmat_scores_bwd_words_kernel(
    const T* __restrict__ q, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const uint8_t* __restrict__ mask, const float* __restrict__ grad, T* __restrict__ dk, T* __restrict__ dv,
    Shape p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using C = Tiles<T, DP>;
  MSA_DYNAMIC_SHARED(smem_raw);
  const Smem<T, DP> sm(smem_raw);
  const int64_t chunks = (p.num_words + p.slots_per_text - 1) / p.slots_per_text;
  const int64_t first_text = (static_cast<int64_t>(blockIdx.x) / chunks) * p.texts_per_tile;
  const int64_t own_w0 = (static_cast<int64_t>(blockIdx.x) % chunks) * p.slots_per_text;
  const int64_t h = blockIdx.y;
  const bool one_chunk = chunks == 1;

  using namespace nvcuda;
  constexpr int kDCols = DP / 16;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_frag[C::kWmma ? kDCols : 1], dv_frag[C::kWmma ? kDCols : 1];
  if constexpr (C::kWmma) {
#pragma unroll
    for (int c = 0; c < kDCols; ++c) {
      wmma::fill_fragment(dk_frag[c], 0.f);
      wmma::fill_fragment(dv_frag[c], 0.f);
    }
  } else {
    for (int e = threadIdx.x; e < 2 * C::BN * DP; e += kThreads) sm.facc[e] = 0.f;
  }

  for (int64_t first_image = 0; first_image < p.num_images; first_image += C::BI) {
    __syncthreads();
    load_images<T, DP>(sm.q, q, p, first_image, h);
    load_images<T, DP>(sm.u, u, p, first_image, h);
    load_grad(sm, p, grad, first_image, first_text);
    if (!one_chunk) {
      full_text_stats(sm, p, k, v, mask, first_text, h);
      finalize_stats(sm, p);
      __syncthreads();
    } else {
      reset_stats(sm);
    }
    load_words<T, DP>(sm.k, sm.v, sm.keep, k, v, mask, p, first_text, own_w0, h);
    __syncthreads();
    tile_products(sm);
    __syncthreads();
    if (one_chunk) {
      update_stats(sm, p);
      __syncthreads();
      finalize_stats(sm, p);
      __syncthreads();
    }
    chunk_grads(sm, p);
    __syncthreads();
    if constexpr (C::kWmma) {
#pragma unroll
      for (int kk = 0; kk < C::BI; kk += 16) {
        // dS^T as a col-major [BN, BI] matrix is dS's row-major [BI, BN] storage.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> ds_frag, dr_frag;
        wmma::load_matrix_sync(ds_frag, sm.ds + kk * C::LDG + warp * 16, C::LDG);
        wmma::load_matrix_sync(dr_frag, sm.dr + kk * C::LDG + warp * 16, C::LDG);
#pragma unroll
        for (int c = 0; c < kDCols; ++c) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> q_frag, u_frag;
          wmma::load_matrix_sync(q_frag, sm.q + kk * C::LDX + c * 16, C::LDX);
          wmma::load_matrix_sync(u_frag, sm.u + kk * C::LDX + c * 16, C::LDX);
          wmma::mma_sync(dk_frag[c], ds_frag, q_frag, dk_frag[c]);
          wmma::mma_sync(dv_frag[c], dr_frag, u_frag, dv_frag[c]);
        }
      }
    } else {
      for (int e = threadIdx.x; e < C::BN * DP; e += kThreads) {
        const int n = e / DP, d = e % DP;
        float gk = 0.f, gv = 0.f;
        for (int i = 0; i < C::BI; ++i) {
          gk += to_float(sm.ds[i * C::LDG + n]) * to_float(sm.q[i * C::LDX + d]);
          gv += to_float(sm.dr[i * C::LDG + n]) * to_float(sm.u[i * C::LDX + d]);
        }
        sm.facc[e] += gk;
        sm.facc[C::BN * DP + e] += gv;
      }
    }
  }
  __syncthreads();
  const auto store = [&](T* dst, int slot, int col, float value) {
    const int64_t j = first_text + slot / p.slots_per_text, l = own_w0 + slot % p.slots_per_text;
    if (slot < p.texts_per_tile * p.slots_per_text && j < p.num_texts && l < p.num_words && col < p.head_dim) {
      dst[j * p.k_stride_t + l * p.k_stride_l + h * p.k_stride_h + col] = from_float<T>(value);
    }
  };
  if constexpr (C::kWmma) {
    float* dk_tile = sm.s;
    float* dv_tile = sm.r;
    for (int c0 = 0; c0 < DP; c0 += C::BN) {
#pragma unroll
      for (int c = 0; c < kDCols; ++c) {
        if (c * 16 >= c0 && c * 16 < c0 + C::BN) {
          wmma::store_matrix_sync(dk_tile + warp * 16 * C::LDS + (c * 16 - c0), dk_frag[c], C::LDS, wmma::mem_row_major);
          wmma::store_matrix_sync(dv_tile + warp * 16 * C::LDS + (c * 16 - c0), dv_frag[c], C::LDS, wmma::mem_row_major);
        }
      }
      __syncthreads();
      for (int e = threadIdx.x; e < C::BN * C::BN; e += kThreads) {
        const int slot = e / C::BN, col = c0 + e % C::BN;
        if (col < DP) {
          store(dk, slot, col, dk_tile[slot * C::LDS + (col - c0)]);
          store(dv, slot, col, dv_tile[slot * C::LDS + (col - c0)]);
        }
      }
      __syncthreads();
    }
  } else {
    for (int e = threadIdx.x; e < C::BN * DP; e += kThreads) {
      store(dk, e / DP, e % DP, sm.facc[e]);
      store(dv, e / DP, e % DP, sm.facc[C::BN * DP + e]);
    }
  }
#endif
}

// Texts per tile and slots per text for this word count (shared with tests/cuda_emulation).
template <typename T, int DP>
void set_slots(Shape& p) {
  using C = Tiles<T, DP>;
  int slots = kMinSlotsPerText;
  while (slots < p.num_words && slots < C::BN) slots *= 2;
  p.slots_per_text = slots;
  p.texts_per_tile = C::BN / slots;
}

#ifndef MSA_CUDA_EMULATION
// ---------------------------------------------------------------------------------------------------------
// Host side.

struct Prepared {
  at::Tensor q, u, k, v, mask;  // mask: [Nt, L] uint8 contiguous, or undefined
  Shape shape;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& word_mask, double scale, const char* name) {
  TORCH_CHECK(q.dim() == 3 && u.sizes() == q.sizes(), name, ": q and u must be [Ni, H, Dh]");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), name, ": k and v must be [Nt, L, H, Dh]");
  TORCH_CHECK(k.size(2) == q.size(1) && k.size(3) == q.size(2), name, ": H and Dh of q and k differ");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              ": CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(u.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype, name,
              ": q, u, k, v must share a dtype");
  TORCH_CHECK(q.size(2) <= 128, name, ": CUDA kernels support head dims up to 128, got ", q.size(2));
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  TORCH_CHECK(major >= 8, name, ": CUDA kernels need compute capability 8.0 or newer, this device has ", major,
              ".x; use backend='triton' or 'reference'");
  Prepared in;
  in.q = q.contiguous();
  in.u = u.contiguous();
  in.k = k.contiguous();
  in.v = v.contiguous();
  if (word_mask.has_value()) {
    TORCH_CHECK(word_mask->dim() == 2 && word_mask->size(0) == k.size(0) && word_mask->size(1) == k.size(1), name,
                ": word_mask must be [Nt, L]");
    in.mask = (*word_mask != 0).to(at::kByte).contiguous();
  }
  Shape& p = in.shape;
  p.num_images = q.size(0);
  p.num_texts = k.size(0);
  p.num_words = k.size(1);
  p.heads = q.size(1);
  p.head_dim = q.size(2);
  p.q_stride_i = in.q.stride(0);
  p.q_stride_h = in.q.stride(1);
  p.k_stride_t = in.k.stride(0);
  p.k_stride_l = in.k.stride(1);
  p.k_stride_h = in.k.stride(2);
  p.scale = static_cast<float>(scale);
  return in;
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T, int DP>
void forward_launch(const Prepared& in, at::Tensor& out) {
  using C = Tiles<T, DP>;
  Shape p = in.shape;
  set_slots<T, DP>(p);
  const int64_t image_tiles = (p.num_images + C::BI - 1) / C::BI;
  const int64_t text_tiles = (p.num_texts + p.texts_per_tile - 1) / p.texts_per_tile;
  TORCH_CHECK(image_tiles * text_tiles < (int64_t{1} << 31), "msa::mscmat_scores: too many tiles for one launch");
  auto kernel = mscmat_scores_fwd_kernel<T, DP>;
  allow_smem(kernel, C::kBytes);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(image_tiles * text_tiles), kThreads, C::kBytes, stream>>>(
      reinterpret_cast<const T*>(in.q.data_ptr()), reinterpret_cast<const T*>(in.u.data_ptr()),
      reinterpret_cast<const T*>(in.k.data_ptr()), reinterpret_cast<const T*>(in.v.data_ptr()),
      in.mask.defined() ? in.mask.data_ptr<uint8_t>() : nullptr, reinterpret_cast<T*>(out.data_ptr()), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DP>
void backward_launch(const Prepared& in, const at::Tensor& grad, at::Tensor& dq, at::Tensor& du, at::Tensor& dk,
                     at::Tensor& dv) {
  using C = Tiles<T, DP>;
  Shape p = in.shape;
  set_slots<T, DP>(p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const T* q = reinterpret_cast<const T*>(in.q.data_ptr());
  const T* u = reinterpret_cast<const T*>(in.u.data_ptr());
  const T* k = reinterpret_cast<const T*>(in.k.data_ptr());
  const T* v = reinterpret_cast<const T*>(in.v.data_ptr());
  const uint8_t* mask = in.mask.defined() ? in.mask.data_ptr<uint8_t>() : nullptr;
  const float* g = grad.data_ptr<float>();
  TORCH_CHECK(p.heads < 65536, "msa::mscmat_scores_backward: at most 65535 heads");

  const int64_t image_tiles = (p.num_images + C::BI - 1) / C::BI;
  auto images_kernel = mscmat_scores_bwd_images_kernel<T, DP>;
  allow_smem(images_kernel, C::kBytes);
  images_kernel<<<dim3(static_cast<unsigned>(image_tiles), static_cast<unsigned>(p.heads)), kThreads, C::kBytes,
                  stream>>>(q, u, k, v, mask, g, reinterpret_cast<T*>(dq.data_ptr()), reinterpret_cast<T*>(du.data_ptr()),
                            p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t chunks = (p.num_words + p.slots_per_text - 1) / p.slots_per_text;
  const int64_t text_tiles = (p.num_texts + p.texts_per_tile - 1) / p.texts_per_tile;
  TORCH_CHECK(text_tiles * chunks < (int64_t{1} << 31), "msa::mscmat_scores_backward: too many tiles");
  auto words_kernel = mscmat_scores_bwd_words_kernel<T, DP>;
  allow_smem(words_kernel, C::kBytes);
  words_kernel<<<dim3(static_cast<unsigned>(text_tiles * chunks), static_cast<unsigned>(p.heads)), kThreads, C::kBytes,
                 stream>>>(q, u, k, v, mask, g, reinterpret_cast<T*>(dk.data_ptr()), reinterpret_cast<T*>(dv.data_ptr()),
                           p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Fn>
void dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  if (head_dim <= 32) {
    fn.template operator()<T, 32>();
  } else if (head_dim <= 64) {
    fn.template operator()<T, 64>();
  } else {
    fn.template operator()<T, 128>();
  }
}

// Calls fn.template operator()<CUDA element type, padded head dim>() for the inputs' dtype and head dim.
template <typename Fn>
void dispatch(at::ScalarType dtype, int64_t head_dim, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return dispatch_head_dim<float>(head_dim, fn);
    case at::kHalf:
      return dispatch_head_dim<__half>(head_dim, fn);
    case at::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(head_dim, fn);
    default:
      TORCH_CHECK(false, "msa::mscmat_scores (CUDA): unsupported dtype ", dtype);
  }
}

at::Tensor mscmat_scores_cuda(const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& word_mask, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared in = prepare(q, u, k, v, word_mask, scale, "msa::mscmat_scores");
  at::Tensor out = at::zeros({in.shape.num_images, in.shape.num_texts}, in.q.options());
  if (out.numel() == 0 || in.shape.num_words == 0 || in.shape.heads == 0) return out;
  dispatch(q.scalar_type(), in.shape.head_dim, [&]<typename T, int DP>() { forward_launch<T, DP>(in, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mscmat_scores_backward_cuda(
    const at::Tensor& grad_scores, const at::Tensor& q, const at::Tensor& u, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& word_mask, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared in = prepare(q, u, k, v, word_mask, scale, "msa::mscmat_scores_backward");
  TORCH_CHECK(grad_scores.dim() == 2 && grad_scores.size(0) == in.shape.num_images &&
                  grad_scores.size(1) == in.shape.num_texts,
              "msa::mscmat_scores_backward: grad_scores must be [Ni, Nt]");
  const at::Tensor grad = grad_scores.to(at::kFloat).contiguous();
  at::Tensor dq = at::zeros_like(in.q), du = at::zeros_like(in.u), dk = at::zeros_like(in.k), dv = at::zeros_like(in.v);
  if (grad.numel() == 0 || in.shape.num_words == 0 || in.shape.heads == 0) return {dq, du, dk, dv};
  dispatch(q.scalar_type(), in.shape.head_dim,
           [&]<typename T, int DP>() { backward_launch<T, DP>(in, grad, dq, du, dk, dv); });
  return {dq, du, dk, dv};
}

#endif  // MSA_CUDA_EMULATION

}  // namespace

#ifndef MSA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(msa, CUDA, m) {
  m.impl("mscmat_scores", &mscmat_scores_cuda);
  m.impl("mscmat_scores_backward", &mscmat_scores_backward_cuda);
}
#endif

}  // namespace msa
