// Warp-level steps of the msa::mscmat_scores CUDA kernels on tensor cores (half and bfloat16), with S and R in
// registers: each warp owns 16 rows of a product; lane l (g = l / 4, t = l % 4) holds, for each column tile n of
// 8 columns, the entries of rows g and g + 8 at columns 8 n + 2 t and 8 n + 2 t + 1 (mma_16816's accumulator
// layout). The masked softmax over a text's slots is a reduction over the four lanes of a quad (they share a
// row); the gradients dS, dR are formed in the same registers and, packed to T, are the A operand of the next
// product as they are (the accumulator layout of two column tiles is the A layout of one 16-wide k step).
//
// Needs, included before it, device_primitives.cuh (CUDA) or tests/cuda_emulation/cuda_emulation.h (CPU), and
// mscmat_tiles.cuh.
#pragma once

#include <cstring>

namespace msa {
namespace {

// S and R of the warp's 16 rows against the BN word slots of a staged tile (or, in dS, dR form, the gradients).
template <typename T, int DP>
struct WarpTile {
  static constexpr int kColumnTiles = Tiles<T, DP>::BN / 8;
  float s[kColumnTiles][4], r[kColumnTiles][4];
};

// Per (text, row half) of the warp's pairs, held by every lane of the quad: the shift of the exponentials (the
// log2-scaled max, 0 while the text has no valid word), and the softmax's den and num = sum_l e_l r_l.
template <int kTexts>
struct QuadStats {
  float m[kTexts][2], den[kTexts][2], num[kTexts][2];
};

// The pair (text, row half) of lane's quad in PairStats' indexing (image row in the tile * texts per tile + text).
template <int kTexts>
__device__ __forceinline__ int quad_pair(int text, int half) {
  const int row = threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4 + 8 * half;
  return row * kTexts + text;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xFFFFFFFFu, x, 1);
  return x + __shfl_xor_sync(0xFFFFFFFFu, x, 2);
}

// Two floats as the T pair an mma operand register holds (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const T pair[2] = {from_float<T>(lo), from_float<T>(hi)};
  uint32_t bits;
  std::memcpy(&bits, pair, sizeof(bits));
  return bits;
}

// rows x 16 of A (row-major, rows LD apart) at `a`: lane's ldmatrix_x4 row address for the A operand of one k step.
template <typename T, int LD>
__device__ __forceinline__ const T* a_rows(const T* a) {
  const int lane = threadIdx.x % 32;
  return a + ((lane >> 3 & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
}

// S = Q_w K^T and R = U_w V^T of rows [16 w, + 16) of the staged q, u tiles against every slot of the staged k,
// v tiles (operands through ldmatrix from the padded rows, which spread each 8-row matrix over all 32 banks).
template <typename T, int DP>
__device__ void warp_products(const T* q, const T* u, const T* k, const T* v, WarpTile<T, DP>& w) {
  using C = Tiles<T, DP>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int n = 0; n < WarpTile<T, DP>::kColumnTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w.s[n][e] = w.r[n][e] = 0.f;
  }
  const T* q_row = a_rows<T, C::LDX>(q + warp * 16 * C::LDX);
  const T* u_row = u + (q_row - q);
  // B, two column tiles of 16 k: matrices (slots 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
  const int word_offset = ((lane >> 4) * 8 + (lane & 7)) * C::LDX + (lane >> 3 & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < DP; kk += 16) {
    uint32_t qa[4], ua[4];
    ldmatrix_x4(qa, q_row + kk);
    ldmatrix_x4(ua, u_row + kk);
#pragma unroll
    for (int n = 0; n < WarpTile<T, DP>::kColumnTiles; n += 2) {
      uint32_t kb[4], vb[4];
      ldmatrix_x4(kb, k + n * 8 * C::LDX + word_offset + kk);
      ldmatrix_x4(vb, v + n * 8 * C::LDX + word_offset + kk);
      mma_16816<T>(w.s[n], qa, kb[0], kb[1]);
      mma_16816<T>(w.s[n + 1], qa, kb[2], kb[3]);
      mma_16816<T>(w.r[n], ua, vb[0], vb[1]);
      mma_16816<T>(w.r[n + 1], ua, vb[2], vb[3]);
    }
  }
}

// acc += A B for the warp's 16 rows, A = the packed rows of `a_tile` (dS or dR, BN wide, in the accumulator layout),
// B the staged [BN, DP] tile b (k = slot): acc holds DP / 8 column tiles of the warp's rows.
template <typename T, int DP>
__device__ void accumulate_from_registers(float (&acc)[DP / 8][4], const float (&a_tile)[Tiles<T, DP>::BN / 8][4],
                                          const T* b) {
  using C = Tiles<T, DP>;
  // B^T rows through ldmatrix .trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
  const T* b_row = a_rows<T, C::LDX>(b);
#pragma unroll
  for (int j = 0; j < C::BN / 16; ++j) {
    const uint32_t a[4] = {pack_pair<T>(a_tile[2 * j][0], a_tile[2 * j][1]),
                           pack_pair<T>(a_tile[2 * j][2], a_tile[2 * j][3]),
                           pack_pair<T>(a_tile[2 * j + 1][0], a_tile[2 * j + 1][1]),
                           pack_pair<T>(a_tile[2 * j + 1][2], a_tile[2 * j + 1][3])};
#pragma unroll
    for (int d = 0; d < DP / 8; d += 2) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, b_row + 16 * j * C::LDX + d * 8);
      mma_16816<T>(acc[d], a, bb[0], bb[1]);
      mma_16816<T>(acc[d + 1], a, bb[2], bb[3]);
    }
  }
}

// acc += G^T B for the warp's 16 columns [16 w, + 16) of a staged [K, LDG] gradient tile G (dS or dR in T, rows
// = the k dimension) and a staged [K, DP] tile b: dk = dS^T Q and dv = dR^T U of the words kernel.
template <typename T, int DP, int K>
__device__ void accumulate_transposed(float (&acc)[DP / 8][4], const T* g, const T* b) {
  using C = Tiles<T, DP>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // A = G^T through ldmatrix .trans: matrices (k 0-7, cols 0-7), (k 0-7, cols 8-15), (k 8-15, 0-7), (k 8-15, 8-15).
  const T* g_row = g + ((lane >> 4) * 8 + (lane & 7)) * C::LDG + warp * 16 + (lane >> 3 & 1) * 8;
  const T* b_row = a_rows<T, C::LDX>(b);
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    uint32_t a[4];
    ldmatrix_x4_trans(a, g_row + kk * C::LDG);
#pragma unroll
    for (int d = 0; d < DP / 8; d += 2) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, b_row + kk * C::LDX + d * 8);
      mma_16816<T>(acc[d], a, bb[0], bb[1]);
      mma_16816<T>(acc[d + 1], a, bb[2], bb[3]);
    }
  }
}

// Stores the warp's dS, dR rows packed to T into the staged gradient tiles [BI, LDG] (the words kernel reads them
// transposed).
template <typename T, int DP>
__device__ void store_grad_tiles(const WarpTile<T, DP>& w, T* ds, T* dr) {
  using C = Tiles<T, DP>;
  const int lane = threadIdx.x % 32;
  const int offset = (threadIdx.x / 32 * 16 + lane / 4) * C::LDG + 2 * (lane % 4);
#pragma unroll
  for (int n = 0; n < WarpTile<T, DP>::kColumnTiles; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int at = offset + 8 * half * C::LDG + 8 * n;
      *reinterpret_cast<uint32_t*>(ds + at) = pack_pair<T>(w.s[n][2 * half], w.s[n][2 * half + 1]);
      *reinterpret_cast<uint32_t*>(dr + at) = pack_pair<T>(w.r[n][2 * half], w.r[n][2 * half + 1]);
    }
  }
}

// Replaces the logits by log2-scaled ones (scale log2(e): exp(x) = exp2(x log2 e)), -inf at masked and padding
// slots (their k, v are zeros: r is 0 there).
template <typename T, int DP>
__device__ void mask_and_scale(WarpTile<T, DP>& w, const float* keep, float scale) {
  const float scale_log2 = scale * 1.4426950408889634f;
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int n = 0; n < WarpTile<T, DP>::kColumnTiles; ++n) {
    const float2 kept = *reinterpret_cast<const float2*>(keep + n * 8 + 2 * t);
#pragma unroll
    for (int e = 0; e < 4; ++e) w.s[n][e] = (e % 2 ? kept.y : kept.x) != 0.f ? w.s[n][e] * scale_log2 : -INFINITY;
  }
}

__device__ __forceinline__ float shift_of(float m) { return m == -INFINITY ? 0.f : m; }  // no valid word: e = 0

// Online-softmax update of the warp's pairs with the staged chunk, texts of TILES_PER_TEXT column tiles: w.s
// (masked, log2-scaled logits) becomes the exponentials e = exp2(x - shift of the updated max); the statistics,
// merged with the previous chunks' from st unless `first`, land in every lane of the quad.
// The max is fmaxf (one instruction; it drops NaN): a NaN logit still makes its e, den and the score NaN, and a
// pair has a valid word exactly when den != 0 (its largest e is 1), NaN included.
template <typename T, int DP, int TILES_PER_TEXT, int kTexts = WarpTile<T, DP>::kColumnTiles / TILES_PER_TEXT>
__device__ void warp_softmax_chunk(WarpTile<T, DP>& w, const PairStats& st, bool first, QuadStats<kTexts>& out) {
#pragma unroll
  for (int text = 0; text < kTexts; ++text) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float chunk_max = -INFINITY;
#pragma unroll
      for (int n = text * TILES_PER_TEXT; n < (text + 1) * TILES_PER_TEXT; ++n) {
        chunk_max = fmaxf(chunk_max, fmaxf(w.s[n][2 * half], w.s[n][2 * half + 1]));
      }
      const int pair = quad_pair<kTexts>(text, half);
      const float m_old = first ? -INFINITY : st.m[pair];
      const float m_new = fmaxf(m_old, quad_max(chunk_max));
      const float shift = shift_of(m_new);
      float den = 0.f, num = 0.f;
#pragma unroll
      for (int n = text * TILES_PER_TEXT; n < (text + 1) * TILES_PER_TEXT; ++n) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          w.s[n][e] = exp2f(w.s[n][e] - shift);
          den += w.s[n][e];
          num += w.s[n][e] * w.r[n][e];
        }
      }
      den = quad_sum(den);
      num = quad_sum(num);
      if (!first) {
        const float alpha = exp2f(m_old - shift);
        den += st.den[pair] * alpha;
        num += st.num[pair] * alpha;
      }
      out.m[text][half] = m_new;
      out.den[text][half] = den;
      out.num[text][half] = num;
    }
  }
}

// Lane t = 0 of each quad stores the running statistics for the next chunk (after every lane has read the old).
template <int kTexts>
__device__ void store_running_stats(const QuadStats<kTexts>& qs, const PairStats& st) {
  __syncwarp();
  if (threadIdx.x % 4 != 0) return;
#pragma unroll
  for (int text = 0; text < kTexts; ++text) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int pair = quad_pair<kTexts>(text, half);
      st.m[pair] = qs.m[text][half];
      st.den[pair] = qs.den[text][half];
      st.num[pair] = qs.num[text][half];
    }
  }
}

// Forward: adds the head's o = num / den of every pair with a valid word to acc (lane t = 0).
template <int kTexts>
__device__ void add_head_scores(const QuadStats<kTexts>& qs, const PairStats& st) {
  if (threadIdx.x % 4 != 0) return;
#pragma unroll
  for (int text = 0; text < kTexts; ++text) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (qs.den[text][half] != 0.f) st.acc[quad_pair<kTexts>(text, half)] += qs.num[text][half] / qs.den[text][half];
    }
  }
}

// Backward: the final statistics as (m, 1 / den, o = num / den); 1 / den = 0 for a text without a valid word.
template <int kTexts>
__device__ void finalize_quad_stats(QuadStats<kTexts>& qs) {
#pragma unroll
  for (int text = 0; text < kTexts; ++text) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float inv_den = qs.den[text][half] != 0.f ? 1.f / qs.den[text][half] : 0.f;
      qs.den[text][half] = inv_den;
      qs.num[text][half] *= inv_den;
    }
  }
}

// The finalized statistics the last statistics step stored (store_running_stats after finalize_quad_stats).
template <int kTexts>
__device__ void load_final_stats(QuadStats<kTexts>& qs, const PairStats& st) {
#pragma unroll
  for (int text = 0; text < kTexts; ++text) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int pair = quad_pair<kTexts>(text, half);
      qs.m[text][half] = st.m[pair];
      qs.den[text][half] = st.den[pair];
      qs.num[text][half] = st.num[pair];
    }
  }
}

// Exponentials e = exp2(x - shift) of masked, log2-scaled logits against the final statistics (a gradient step
// of a text longer than one chunk).
template <typename T, int DP, int TILES_PER_TEXT, int kTexts>
__device__ void exps_from_final(WarpTile<T, DP>& w, const QuadStats<kTexts>& qs) {
#pragma unroll
  for (int n = 0; n < WarpTile<T, DP>::kColumnTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w.s[n][e] = exp2f(w.s[n][e] - shift_of(qs.m[n / TILES_PER_TEXT][e / 2]));
  }
}

// grad_scores of the warp's pairs (0 outside the matrix), every lane of the quad.
template <int kTexts>
__device__ void load_pair_grads(float (&g)[kTexts][2], const float* grad, const Shape& p, int64_t first_image,
                                int64_t first_text) {
  const int row = threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
#pragma unroll
  for (int text = 0; text < kTexts; ++text) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t i = first_image + row + 8 * half, j = first_text + text;
      g[text][half] = i < p.num_images && j < p.num_texts ? grad[i * p.num_texts + j] : 0.f;
    }
  }
}

// dS = g p (r - o) scale and dR = g p in place of e and r (p = e / den); 0 at masked and padding slots, whatever
// o is (a masked word is outside the softmax).
template <typename T, int DP, int TILES_PER_TEXT, int kTexts>
__device__ void pair_grads(WarpTile<T, DP>& w, const float* keep, const QuadStats<kTexts>& qs,
                           const float (&g)[kTexts][2], float scale) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int n = 0; n < WarpTile<T, DP>::kColumnTiles; ++n) {
    const float2 kept = *reinterpret_cast<const float2*>(keep + n * 8 + 2 * t);
    const int text = n / TILES_PER_TEXT;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int half = e / 2;
      const float gp = w.s[n][e] * (g[text][half] * qs.den[text][half]);
      const bool valid = (e % 2 ? kept.y : kept.x) != 0.f;
      w.s[n][e] = valid ? gp * (w.r[n][e] - qs.num[text][half]) * scale : 0.f;
      w.r[n][e] = valid ? gp : 0.f;
    }
  }
}

// The gradients dS, dR of the warp's pairs for the staged chunk, in place of S and R, for a kernel step that
// either has the whole text in one chunk (statistics first) or has the final statistics in st.
template <typename T, int DP, int TILES_PER_TEXT>
__device__ void warp_grads(WarpTile<T, DP>& w, const float* keep, const PairStats& st, const float* grad,
                           const Shape& p, int64_t first_image, int64_t first_text, bool one_chunk) {
  constexpr int kTexts = WarpTile<T, DP>::kColumnTiles / TILES_PER_TEXT;
  float g[kTexts][2];
  load_pair_grads<kTexts>(g, grad, p, first_image, first_text);  // global loads, in flight during the softmax
  QuadStats<kTexts> qs;
  mask_and_scale<T, DP>(w, keep, p.scale);
  if (one_chunk) {
    warp_softmax_chunk<T, DP, TILES_PER_TEXT>(w, st, true, qs);
    finalize_quad_stats<kTexts>(qs);
  } else {
    load_final_stats<kTexts>(qs, st);
    exps_from_final<T, DP, TILES_PER_TEXT>(w, qs);
  }
  pair_grads<T, DP, TILES_PER_TEXT>(w, keep, qs, g, p.scale);
}

// A statistics step of a text longer than one chunk: the running statistics, finalized after the last chunk.
template <typename T, int DP, int TILES_PER_TEXT>
__device__ void warp_stats_step(WarpTile<T, DP>& w, const float* keep, const PairStats& st, const Shape& p,
                                bool first, bool last) {
  constexpr int kTexts = WarpTile<T, DP>::kColumnTiles / TILES_PER_TEXT;
  QuadStats<kTexts> qs;
  mask_and_scale<T, DP>(w, keep, p.scale);
  warp_softmax_chunk<T, DP, TILES_PER_TEXT>(w, st, first, qs);
  if (last) finalize_quad_stats<kTexts>(qs);
  store_running_stats<kTexts>(qs, st);
}

// The warp's rows of a [rows, DP] accumulator (acc as accumulate_from_registers leaves it) to store(row, col,
// value), row within the tile.
template <int DP, typename Store>
__device__ void store_warp_rows(const float (&acc)[DP / 8][4], Store store) {
  const int lane = threadIdx.x % 32;
  const int row = threadIdx.x / 32 * 16 + lane / 4;
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) store(row + 8 * (e / 2), 8 * n + 2 * (lane % 4) + e % 2, acc[n][e]);
  }
}

// Calls fn.template operator()<TILES_PER_TEXT>() for the tile's slots per text (16, 32 or 64): one
// specialisation of the softmax each, so that a text's column tiles are known at compile time (the branch is
// uniform over the block).
template <typename Fn>
__device__ __forceinline__ void dispatch_text_tiles(const Shape& p, Fn&& fn) {
  if (p.slots_shift == 4) {
    fn.template operator()<2>();
  } else if (p.slots_shift == 5) {
    fn.template operator()<4>();
  } else {
    fn.template operator()<8>();
  }
}

// One forward step of the block: every warp its 16 image rows, S and R in registers.
template <typename T, int DP>
__device__ void warp_forward_step(const T* q, const T* u, const T* k, const T* v, const float* keep,
                                  const PairStats& st, const Shape& p, bool first, bool last) {
  WarpTile<T, DP> w;
  warp_products<T, DP>(q, u, k, v, w);
  mask_and_scale<T, DP>(w, keep, p.scale);
  dispatch_text_tiles(p, [&]<int TILES_PER_TEXT>() {
    constexpr int kTexts = WarpTile<T, DP>::kColumnTiles / TILES_PER_TEXT;
    QuadStats<kTexts> qs;
    warp_softmax_chunk<T, DP, TILES_PER_TEXT>(w, st, first, qs);
    if (last) {
      add_head_scores<kTexts>(qs, st);
    } else {
      store_running_stats<kTexts>(qs, st);
    }
  });
}

// One backward step of the block: every warp its 16 image rows, S and R recomputed in registers. A statistics step
// (a long text's chunk `chunk` of `chunks`, the statistics pass) updates the pairs' statistics; any other step
// leaves dS, dR in w.s, w.r and returns true.
template <typename T, int DP>
__device__ bool warp_backward_step(const T* q, const T* u, const T* k, const T* v, const float* keep,
                                   const PairStats& st, const float* grad, const Shape& p, int64_t first_image,
                                   int64_t first_text, int chunk, int chunks, bool stats_step, WarpTile<T, DP>& w) {
  warp_products<T, DP>(q, u, k, v, w);
  dispatch_text_tiles(p, [&]<int TILES_PER_TEXT>() {
    if (stats_step) {
      warp_stats_step<T, DP, TILES_PER_TEXT>(w, keep, st, p, chunk == 0, chunk == chunks - 1);
    } else {
      warp_grads<T, DP, TILES_PER_TEXT>(w, keep, st, grad, p, first_image, first_text, chunks == 1);
    }
  });
  return !stats_step;
}

}  // namespace
}  // namespace msa
