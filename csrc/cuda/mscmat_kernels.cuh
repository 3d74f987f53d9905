// Kernels of msa::mscmat_scores, forward and backward. Included by mscmat_cuda.cu (with device_primitives.cuh)
// and by tests/cuda_emulation (with cuda_emulation.h), after mscmat_tiles.cuh and mscmat_warp.cuh.
//
//   scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
//   p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
//   r[i,j,h,l]  = <u[i,h], v[j,l,h]>
//
// Tiling: a tile holds BI images and BN "word slots". The slots hold BT = BN / LP texts of LP slots each (LP =
// the word count rounded up to a power of two >= 16, at most BN); texts longer than BN are walked in chunks of
// BN words with an online softmax. A step stages Q_h, U_h [BI, Dh] and K_h, V_h [BN, Dh] in shared memory
// (mscmat_tiles.cuh: cp.async, double-buffered) and computes S = Q K^T and R = U V^T (float32). For half and
// bfloat16 they stay in registers (mma.sync, each warp 16 image rows), where the masked softmax, the weighted
// sum and the gradients run, a quad of lanes per row (mscmat_warp.cuh); float32 (plain FMAs) puts S and R in
// shared memory, where one thread per (image, text) pair runs the softmax.
//
// Forward: a block owns one text tile and up to kMaxImageTilesPerBlock image tiles; it walks heads, word chunks
// and, fastest, its image tiles, so a text tile's k and v are staged once per head and chunk and the image tiles
// stream past them.
//
// Backward recomputes S and R and turns them into dS = g p (r - o) scale and dR = g p (o = sum_l p r per
// image, text and head). One kernel owns an image tile and a head and loops over all texts (dq = dS K,
// du = dR V); the other owns a word chunk of a text tile and a head and loops over all images
// (dk = dS^T Q, dv = dR^T U). Every gradient element is summed inside one block: no atomics, deterministic. On
// tensor cores the images kernel multiplies dS, dR straight from the registers; the words kernel needs them
// transposed (a warp owns 16 word slots of dk, dv) and passes them through one shared tile.
//
// A NaN in a valid word's logit or value makes the pair's score (and gradients) NaN, as the float64 reference's
// softmax does; a text without a valid word scores 0 and gets zero gradients.
//
// Tensor cores need sm_80 or newer (bfloat16 mma.sync, ldmatrix, cp.async); the launcher checks the device's
// capability.
#pragma once

namespace msa {
namespace {

// float32: S = Q K^T and R = U V^T of the staged tiles into shared memory, plain FMAs with 16-byte shared loads;
// a warp reads one Q row (broadcast) and 32 K rows LDX = DP + 4 floats apart, which a quarter-warp's 8 float4
// loads spread over all 32 banks.
template <int DP>
__device__ void float_products(const float* q, const float* u, const float* k, const float* v, float* s, float* r) {
  using C = Tiles<float, DP>;
  for (int e = threadIdx.x; e < C::BI * C::BN; e += kThreads) {
    const int i = e / C::BN, n = e % C::BN;
    const float4* q_row = reinterpret_cast<const float4*>(q + i * C::LDX);
    const float4* u_row = reinterpret_cast<const float4*>(u + i * C::LDX);
    const float4* k_row = reinterpret_cast<const float4*>(k + n * C::LDX);
    const float4* v_row = reinterpret_cast<const float4*>(v + n * C::LDX);
    float s_sum = 0.f, r_sum = 0.f;
#pragma unroll 4
    for (int d = 0; d < DP / 4; ++d) {
      const float4 a = q_row[d], b = k_row[d], c = u_row[d], w = v_row[d];
      s_sum += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
      r_sum += c.x * w.x + c.y * w.y + c.z * w.z + c.w * w.w;
    }
    s[i * C::LDS + n] = s_sum;
    r[i * C::LDS + n] = r_sum;
  }
}

// Online-softmax update of every (image, text) pair with the slots of the staged chunk; `first` starts the
// statistics afresh (the chunk holds the texts' first words).
template <typename C>
__device__ void update_stats(const float* s, const float* r, const float* keep, const PairStats& st, const Shape& p,
                             bool first) {
  const int LP = p.slots_per_text;
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const int i = pair / p.texts_per_tile, t = pair % p.texts_per_tile;
    const float* s_row = s + i * C::LDS + t * LP;
    const float* r_row = r + i * C::LDS + t * LP;
    const float* keep_row = keep + t * LP;
    float chunk_max = -INFINITY;
    for (int l = 0; l < LP; ++l) {
      if (keep_row[l] != 0.f) chunk_max = max_keep_nan(chunk_max, s_row[l] * p.scale);
    }
    const float m_old = first ? -INFINITY : st.m[pair];
    const float den_old = first ? 0.f : st.den[pair], num_old = first ? 0.f : st.num[pair];
    const float m_new = max_keep_nan(m_old, chunk_max);
    float den = 0.f, num = 0.f, alpha = 1.f;
    if (m_new != -INFINITY) {         // else no valid word so far
      alpha = __expf(m_old - m_new);  // m_old = -inf gives 0
      for (int l = 0; l < LP; ++l) {
        if (keep_row[l] != 0.f) {
          const float e = __expf(s_row[l] * p.scale - m_new);
          den += e;
          num += e * r_row[l];
        }
      }
    }
    st.m[pair] = m_new;
    st.den[pair] = den_old * alpha + den;
    st.num[pair] = num_old * alpha + num;
  }
}

// Forward, after a text's last chunk: adds the head's score o = num / den of every pair with a valid word to acc.
template <typename C>
__device__ void add_head_scores(const PairStats& st, const Shape& p) {
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    if (st.m[pair] != -INFINITY) st.acc[pair] += st.num[pair] / st.den[pair];
  }
}

// Backward: (m, den, num) -> (m, 1 / den, o = num / den) per pair; a text without a valid word gets 1 / den = 0.
template <typename C>
__device__ void finalize_stats(const PairStats& st, const Shape& p) {
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const float inv_den = st.m[pair] != -INFINITY ? 1.f / st.den[pair] : 0.f;
    st.den[pair] = inv_den;
    st.num[pair] = st.num[pair] * inv_den;
  }
}

// dS = g p (r - o) scale and dR = g p of the staged chunk, into shared memory in T (g = st.acc).
template <typename T, int DP>
__device__ void chunk_grads(const float* s, const float* r, const float* keep, const PairStats& st, T* ds, T* dr,
                            const Shape& p) {
  using C = Tiles<T, DP>;
  const int LP = p.slots_per_text;
  for (int e = threadIdx.x; e < C::BI * C::BN; e += kThreads) {
    const int i = e / C::BN, n = e % C::BN;
    const int t = n / LP;
    float ds_value = 0.f, dr_value = 0.f;
    // keep[n] != 0: the slot is a valid word, so its text has one and m, 1 / den are set.
    if (t < p.texts_per_tile && keep[n] != 0.f) {
      const int pair = i * p.texts_per_tile + t;
      const float gp = st.acc[pair] * __expf(s[i * C::LDS + n] * p.scale - st.m[pair]) * st.den[pair];
      dr_value = gp;
      ds_value = gp * (r[i * C::LDS + n] - st.num[pair]) * p.scale;
    }
    ds[i * C::LDG + n] = from_float<T>(ds_value);
    dr[i * C::LDG + n] = from_float<T>(dr_value);
  }
}

// grad_scores of the pairs of an image tile and a text tile, 0 outside the matrix.
template <typename C>
__device__ void load_grad(float* dst, const Shape& p, const float* grad, int64_t first_image, int64_t first_text) {
  for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
    const int64_t i = first_image + pair / p.texts_per_tile, j = first_text + pair % p.texts_per_tile;
    dst[pair] = (i < p.num_images && j < p.num_texts) ? grad[i * p.num_texts + j] : 0.f;
  }
}

template <typename T, typename L>
__device__ PairStats pair_stats(const Smem<T, L>& sm, int group) {
  return PairStats{sm.stat(group, 0), sm.stat(group, 1), sm.stat(group, 2), sm.stat(group, 3)};
}

// Scores of one text tile and image tiles [first, first + image_tiles_per_block) (blockIdx.x = text tile *
// image groups + image group).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    mscmat_scores_fwd_kernel(const T* __restrict__ q, const T* __restrict__ u, const T* __restrict__ k,
                             const T* __restrict__ v, const uint8_t* __restrict__ mask, T* __restrict__ out, Shape p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the launcher refuses devices older than sm_80
#else
  using C = Tiles<T, DP>;
  using L = ForwardLayout<T, DP>;
  MSA_DYNAMIC_SHARED(smem_raw);
  const Smem<T, L> sm{smem_raw};
  // 32-bit division (a 64-bit one is a subroutine call): image tiles and blocks stay far below 2^32.
  const unsigned image_tiles = static_cast<unsigned>((p.num_images + C::BI - 1) / C::BI);
  const unsigned per_block = static_cast<unsigned>(p.image_tiles_per_block);
  const unsigned groups = (image_tiles + per_block - 1) / per_block;
  const int64_t first_tile = static_cast<int64_t>(blockIdx.x % groups * per_block);
  const int64_t first_text = static_cast<int64_t>(blockIdx.x / groups) * p.texts_per_tile;
  const int tiles = static_cast<int>(image_tiles - first_tile < per_block ? image_tiles - first_tile : per_block);
  const int chunks = static_cast<int>((p.num_words + p.slots_per_text - 1) >> p.slots_shift);
  const auto tiles_at = [&](int64_t h, int c, int g) {
    return StepTiles{(first_tile + g) * C::BI, first_text, static_cast<int64_t>(c) * p.slots_per_text, h};
  };
  for (int g = 0; g < tiles; ++g) {
    const PairStats st = pair_stats(sm, g);
    for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) st.acc[pair] = 0.f;
  }
  Stager<T, DP, L> stager(sm, q, u, k, v, mask, p);
  stager.start(tiles_at(0, 0, 0));
  // Steps: heads, word chunks, and fastest the block's image tiles.
  for (int64_t h = 0; h < p.heads; ++h) {
    for (int c = 0; c < chunks; ++c) {
      for (int g = 0; g < tiles; ++g) {
        const StepTiles cur = tiles_at(h, c, g);
        const StepTiles next =
            g + 1 < tiles ? tiles_at(h, c, g + 1) : (c + 1 < chunks ? tiles_at(h, c + 1, 0) : tiles_at(h + 1, 0, 0));
        const bool has_next = g + 1 < tiles || c + 1 < chunks || h + 1 < p.heads;
        stager.begin_step(cur, next, has_next);
        const PairStats st = pair_stats(sm, g);
        if constexpr (C::kTensorCores) {
          warp_forward_step<T, DP>(sm.q(stager.image_stage), sm.u(stager.image_stage), sm.k(stager.word_stage),
                                   sm.v(stager.word_stage), sm.keep(stager.word_stage), st, p, c == 0,
                                   c == chunks - 1);
        } else {
          float_products<DP>(sm.q(stager.image_stage), sm.u(stager.image_stage), sm.k(stager.word_stage),
                             sm.v(stager.word_stage), sm.s(), sm.r());
          __syncthreads();
          // update_stats and add_head_scores give each pair to the same thread: no barrier between them.
          update_stats<C>(sm.s(), sm.r(), sm.keep(stager.word_stage), st, p, c == 0);
          if (c == chunks - 1) add_head_scores<C>(st, p);
        }
        stager.end_step(cur, next, has_next);
      }
    }
  }
  for (int g = 0; g < tiles; ++g) {
    const PairStats st = pair_stats(sm, g);
    for (int pair = threadIdx.x; pair < C::BI * p.texts_per_tile; pair += kThreads) {
      const int64_t i = (first_tile + g) * C::BI + pair / p.texts_per_tile;
      const int64_t j = first_text + pair % p.texts_per_tile;
      if (i < p.num_images && j < p.num_texts) out[i * p.num_texts + j] = from_float<T>(st.acc[pair]);
    }
  }
#endif
}

// float32 backward step after the products (S, R in shared memory): the statistics (a long text's chunks one
// per statistics step, finalized after the last; the whole step when one chunk holds the texts), then, unless
// this is a statistics step, dS and dR into the shared gradient tiles. Returns whether it formed them.
template <int DP, typename L>
__device__ bool float_grads(const Smem<float, L>& sm, const float* keep, const PairStats& st, const Shape& p,
                            int chunk, int chunks, bool stats_step) {
  using C = Tiles<float, DP>;
  __syncthreads();
  if (stats_step || chunks == 1) {
    update_stats<C>(sm.s(), sm.r(), keep, st, p, chunk == 0);
    if (chunk == chunks - 1) finalize_stats<C>(st, p);
    if (chunks == 1) __syncthreads();
  }
  if (stats_step) return false;
  chunk_grads<float, DP>(sm.s(), sm.r(), keep, st, sm.ds(), sm.dr(), p);
  __syncthreads();
  return true;
}

// dq, du of one image tile (blockIdx.x) and one head (blockIdx.y).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    mscmat_scores_bwd_images_kernel(const T* __restrict__ q, const T* __restrict__ u, const T* __restrict__ k,
                                    const T* __restrict__ v, const uint8_t* __restrict__ mask,
                                    const float* __restrict__ grad, T* __restrict__ dq, T* __restrict__ du, Shape p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using C = Tiles<T, DP>;
  using L = ImagesGradLayout<T, DP>;
  MSA_DYNAMIC_SHARED(smem_raw);
  const Smem<T, L> sm{smem_raw};
  const int64_t first_image = static_cast<int64_t>(blockIdx.x) * C::BI;
  const int64_t h = blockIdx.y;
  const int chunks = static_cast<int>((p.num_words + p.slots_per_text - 1) >> p.slots_shift);
  const bool one_chunk = chunks == 1;
  // Per text tile: one step when the texts fit one chunk, else a statistics pass and a gradient pass.
  const int steps_per_tile = one_chunk ? 1 : 2 * chunks;
  const auto tiles_at = [&](int64_t first_text, int in_tile) {
    const int c = in_tile < chunks ? in_tile : in_tile - chunks;
    return StepTiles{first_image, first_text, static_cast<int64_t>(c) * p.slots_per_text, h};
  };
  const PairStats st = pair_stats(sm, 0);
  // Tensor cores: each warp keeps its 16 rows of dq and du in registers; float32: they live in sm.facc().
  float dq_acc[C::kTensorCores ? DP / 8 : 1][4] = {}, du_acc[C::kTensorCores ? DP / 8 : 1][4] = {};
  if constexpr (!C::kTensorCores) {
    for (int e = threadIdx.x; e < 2 * C::BI * DP; e += kThreads) sm.facc()[e] = 0.f;
  }

  Stager<T, DP, L> stager(sm, q, u, k, v, mask, p);
  stager.start(tiles_at(0, 0));
  for (int64_t first_text = 0; first_text < p.num_texts; first_text += p.texts_per_tile) {
    for (int in_tile = 0; in_tile < steps_per_tile; ++in_tile) {
      const int c = in_tile < chunks ? in_tile : in_tile - chunks;
      const bool stats_step = in_tile < chunks && !one_chunk;  // the statistics pass over a long text's chunks
      const StepTiles cur = tiles_at(first_text, in_tile);
      const bool last_in_tile = in_tile + 1 == steps_per_tile;
      const StepTiles next =
          last_in_tile ? tiles_at(first_text + p.texts_per_tile, 0) : tiles_at(first_text, in_tile + 1);
      const bool has_next = !last_in_tile || first_text + p.texts_per_tile < p.num_texts;
      stager.begin_step(cur, next, has_next);
      const T* k_tile = sm.k(stager.word_stage);
      const T* v_tile = sm.v(stager.word_stage);
      const float* keep = sm.keep(stager.word_stage);
      if constexpr (C::kTensorCores) {
        WarpTile<T, DP> w;
        if (warp_backward_step<T, DP>(sm.q(0), sm.u(0), k_tile, v_tile, keep, st, grad, p, first_image, first_text, c,
                                      chunks, stats_step, w)) {  // dq += dS K, du += dR V straight from the registers
          accumulate_from_registers<T, DP>(dq_acc, w.s, k_tile);
          accumulate_from_registers<T, DP>(du_acc, w.r, v_tile);
        }
      } else {
        if (in_tile == 0) load_grad<C>(st.acc, p, grad, first_image, first_text);
        float_products<DP>(sm.q(0), sm.u(0), k_tile, v_tile, sm.s(), sm.r());
        if (float_grads<DP>(sm, keep, st, p, c, chunks, stats_step)) {
          for (int e = threadIdx.x; e < C::BI * DP; e += kThreads) {
            const int i = e / DP, d = e % DP;
            float gq = 0.f, gu = 0.f;
            for (int n = 0; n < C::BN; ++n) {
              gq += to_float(sm.ds()[i * C::LDG + n]) * to_float(k_tile[n * C::LDX + d]);
              gu += to_float(sm.dr()[i * C::LDG + n]) * to_float(v_tile[n * C::LDX + d]);
            }
            sm.facc()[e] += gq;
            sm.facc()[C::BI * DP + e] += gu;
          }
        }
      }
      stager.end_step(cur, next, has_next);
    }
  }
  // Rows beyond Ni and columns beyond Dh are not written.
  const auto store_to = [&](T* dst) {
    return [=](int row, int col, float value) {
      const int64_t i = first_image + row;
      if (i < p.num_images && col < p.head_dim) dst[i * p.q_stride_i + h * p.q_stride_h + col] = from_float<T>(value);
    };
  };
  if constexpr (C::kTensorCores) {
    store_warp_rows<DP>(dq_acc, store_to(dq));
    store_warp_rows<DP>(du_acc, store_to(du));
  } else {
    const auto store_dq = store_to(dq), store_du = store_to(du);
    for (int e = threadIdx.x; e < C::BI * DP; e += kThreads) {
      store_dq(e / DP, e % DP, sm.facc()[e]);
      store_du(e / DP, e % DP, sm.facc()[C::BI * DP + e]);
    }
  }
#endif
}

// dk, dv of one word chunk of one text tile (blockIdx.x = tile * chunks + chunk) and one head (blockIdx.y).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    mscmat_scores_bwd_words_kernel(const T* __restrict__ q, const T* __restrict__ u, const T* __restrict__ k,
                                   const T* __restrict__ v, const uint8_t* __restrict__ mask,
                                   const float* __restrict__ grad, T* __restrict__ dk, T* __restrict__ dv, Shape p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using C = Tiles<T, DP>;
  using L = WordsGradLayout<T, DP>;
  MSA_DYNAMIC_SHARED(smem_raw);
  const Smem<T, L> sm{smem_raw};
  const int chunks = static_cast<int>((p.num_words + p.slots_per_text - 1) >> p.slots_shift);
  const int64_t first_text = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(chunks)) * p.texts_per_tile;
  const int64_t own_w0 = static_cast<int64_t>(blockIdx.x % static_cast<unsigned>(chunks)) * p.slots_per_text;
  const int64_t h = blockIdx.y;
  const bool one_chunk = chunks == 1;
  // Per image tile: one step when the texts fit one chunk, else statistics over every chunk, then the own chunk.
  const int steps_per_tile = one_chunk ? 1 : chunks + 1;
  const auto tiles_at = [&](int64_t first_image, int in_tile) {
    const int64_t w0 = in_tile < chunks && !one_chunk ? static_cast<int64_t>(in_tile) * p.slots_per_text : own_w0;
    return StepTiles{first_image, first_text, w0, h};
  };
  const PairStats st = pair_stats(sm, 0);
  // Tensor cores: each warp keeps 16 slots' rows of dk and dv in registers; float32: they live in sm.facc().
  float dk_acc[C::kTensorCores ? DP / 8 : 1][4] = {}, dv_acc[C::kTensorCores ? DP / 8 : 1][4] = {};
  if constexpr (!C::kTensorCores) {
    for (int e = threadIdx.x; e < 2 * C::BN * DP; e += kThreads) sm.facc()[e] = 0.f;
  }

  Stager<T, DP, L> stager(sm, q, u, k, v, mask, p);
  stager.start(tiles_at(0, 0));
  for (int64_t first_image = 0; first_image < p.num_images; first_image += C::BI) {
    for (int in_tile = 0; in_tile < steps_per_tile; ++in_tile) {
      const bool stats_step = in_tile < chunks && !one_chunk;
      const StepTiles cur = tiles_at(first_image, in_tile);
      const bool last_in_tile = in_tile + 1 == steps_per_tile;
      const StepTiles next = last_in_tile ? tiles_at(first_image + C::BI, 0) : tiles_at(first_image, in_tile + 1);
      const bool has_next = !last_in_tile || first_image + C::BI < p.num_images;
      stager.begin_step(cur, next, has_next);
      const T* q_tile = sm.q(stager.image_stage);
      const T* u_tile = sm.u(stager.image_stage);
      const float* keep = sm.keep(stager.word_stage);
      if constexpr (C::kTensorCores) {
        WarpTile<T, DP> w;
        if (warp_backward_step<T, DP>(q_tile, u_tile, sm.k(stager.word_stage), sm.v(stager.word_stage), keep, st,
                                      grad, p, first_image, first_text, in_tile, chunks, stats_step, w)) {
          // dk += dS^T Q, dv += dR^T U: dS, dR change hands between warps through shared memory
          store_grad_tiles<T, DP>(w, sm.ds(), sm.dr());
          __syncthreads();
          accumulate_transposed<T, DP, C::BI>(dk_acc, sm.ds(), q_tile);
          accumulate_transposed<T, DP, C::BI>(dv_acc, sm.dr(), u_tile);
        }
      } else {
        if (in_tile == 0) load_grad<C>(st.acc, p, grad, first_image, first_text);
        float_products<DP>(q_tile, u_tile, sm.k(stager.word_stage), sm.v(stager.word_stage), sm.s(), sm.r());
        if (float_grads<DP>(sm, keep, st, p, in_tile, chunks, stats_step)) {
          for (int e = threadIdx.x; e < C::BN * DP; e += kThreads) {
            const int n = e / DP, d = e % DP;
            float gk = 0.f, gv = 0.f;
            for (int i = 0; i < C::BI; ++i) {
              gk += to_float(sm.ds()[i * C::LDG + n]) * to_float(q_tile[i * C::LDX + d]);
              gv += to_float(sm.dr()[i * C::LDG + n]) * to_float(u_tile[i * C::LDX + d]);
            }
            sm.facc()[e] += gk;
            sm.facc()[C::BN * DP + e] += gv;
          }
        }
      }
      stager.end_step(cur, next, has_next);
    }
  }
  // Slots of padding, texts beyond Nt, words beyond L and columns beyond Dh are not written.
  const auto store_to = [&](T* dst) {
    return [=](int slot, int col, float value) {
      const int64_t j = first_text + slot / p.slots_per_text, l = own_w0 + slot % p.slots_per_text;
      if (slot < p.texts_per_tile * p.slots_per_text && j < p.num_texts && l < p.num_words && col < p.head_dim) {
        dst[j * p.k_stride_t + l * p.k_stride_l + h * p.k_stride_h + col] = from_float<T>(value);
      }
    };
  };
  if constexpr (C::kTensorCores) {
    store_warp_rows<DP>(dk_acc, store_to(dk));
    store_warp_rows<DP>(dv_acc, store_to(dv));
  } else {
    const auto store_dk = store_to(dk), store_dv = store_to(dv);
    for (int e = threadIdx.x; e < C::BN * DP; e += kThreads) {
      store_dk(e / DP, e % DP, sm.facc()[e]);
      store_dv(e / DP, e % DP, sm.facc()[C::BN * DP + e]);
    }
  }
#endif
}

}  // namespace
}  // namespace msa
