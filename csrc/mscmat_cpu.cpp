// Fused CPU kernels of msa::mscmat_scores, forward and backward.
//
//   scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
//   p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
//   r[i,j,h,l]  = <u[i,h], v[j,l,h]>
//
// Tiling: the output is cut into tiles of (image block) x (text block). For one tile and one head the
// logits S = Q_h K_h^T and the readouts R = U_h V_h^T are two small GEMMs ([bi, Dh] x [Dh, bj*L]) done by
// ATen's BLAS into a per-thread scratch buffer that stays in L2; the masked softmax over each text's L
// words and the weighted sum with R run straight after, while the tile is still in cache. Nothing of size
// Ni*Nt*L is ever allocated: the scratch is bi * bj * L per thread.
//
// Backward recomputes S and R per tile (no softmax is stored), turns them in place into
//   dS = g * p * (r - o) * scale   and   dR = g * p          (o = sum_l p r, the head's output)
// and accumulates dq += dS K, dk += dS^T Q, du += dR V, dv += dR^T U with four more GEMMs.
// Work items are (head, image chunk): heads never share a gradient slice, so as long as there are at
// least as many heads as threads, every thread writes its own slices and no reduction is needed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace msa {
namespace {

// One clone per x86-64 micro-architecture level: the softmax loops vectorize to the widest one the
// machine has, picked once at load time (GCC/Clang ifunc). Elsewhere the plain build is used.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define MSA_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSA_TARGET_CLONES
#endif
// The helpers below must be inlined into each clone to be compiled for its instruction set.
#if defined(__GNUC__) || defined(__clang__)
#define MSA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSA_ALWAYS_INLINE inline
#endif

// exp for float that the compiler can vectorize: e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2,
// and a degree-6 polynomial for e^r (Cephes' expf coefficients, ~1 ulp). NaN stays NaN because the
// clamps compare false on it; -inf gives e^-87, which the caller multiplies by 0.
MSA_ALWAYS_INLINE float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_pow_n;
  std::memcpy(&two_pow_n, &exponent_bits, sizeof(float));
  return poly * two_pow_n;
}

inline double exp_approx(double x) {
  return std::exp(x);
}

// Turns the logits of one (image, text, head) segment into unnormalised softmax weights e (written over
// the logits) and returns their maximum; -inf when no word is valid, NaN when no valid logit is a number. `keep` is 1 for a valid word and 0 for
// a masked one: a float, not a bool, so that both loops compile to compares and blends and vectorize.
template <typename scalar_t>
MSA_ALWAYS_INLINE scalar_t masked_exp_segment(scalar_t* logits, const scalar_t* keep, int64_t num_words,
                                              scalar_t scale) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  scalar_t row_max = kNegInf;
#pragma omp simd reduction(max : row_max)
  for (int64_t l = 0; l < num_words; ++l) {
    const scalar_t logit = keep[l] != scalar_t(0) ? logits[l] * scale : kNegInf;
    logits[l] = logit;
    row_max = logit > row_max ? logit : row_max;
  }
  if (row_max == kNegInf) {
    const bool any_valid = std::any_of(keep, keep + num_words, [](scalar_t x) { return x != scalar_t(0); });
    if (!any_valid) {
      return row_max;
    }
    // Every valid logit is NaN or -inf (the max skips NaN): the softmax is undefined, NaN as in torch.
    std::fill(logits, logits + num_words, std::numeric_limits<scalar_t>::quiet_NaN());
    return std::numeric_limits<scalar_t>::quiet_NaN();
  }
#pragma omp simd
  for (int64_t l = 0; l < num_words; ++l) {
    const scalar_t e = exp_approx(logits[l] - row_max);
    logits[l] = keep[l] != scalar_t(0) ? e : scalar_t(0);
  }
  return row_max;
}

// Forward epilogue of one tile and head: acc[i, j] += sum_l softmax(S)[i, j, l] * R[i, j, l].
template <typename scalar_t>
MSA_ALWAYS_INLINE void forward_tile_epilogue(
    scalar_t* logits, const scalar_t* readouts, const scalar_t* keep, int64_t bi, int64_t bj, int64_t num_words,
    scalar_t scale, scalar_t* acc) {
  const int64_t row = bj * num_words;
  for (int64_t i = 0; i < bi; ++i) {
    for (int64_t j = 0; j < bj; ++j) {
      scalar_t* e = logits + i * row + j * num_words;
      const scalar_t* r = readouts + i * row + j * num_words;
      if (masked_exp_segment(e, keep + j * num_words, num_words, scale) == -std::numeric_limits<scalar_t>::infinity()) {
        continue;  // a text with no valid word contributes exactly 0
      }
      scalar_t denom = 0, weighted = 0;
#pragma omp simd reduction(+ : denom, weighted)
      for (int64_t l = 0; l < num_words; ++l) {
        denom += e[l];
        weighted += e[l] * r[l];
      }
      acc[i * bj + j] += weighted / denom;
    }
  }
}

// Backward epilogue of one tile and head: logits -> dS, readouts -> dR in place.
template <typename scalar_t>
MSA_ALWAYS_INLINE void backward_tile_epilogue(
    scalar_t* logits, scalar_t* readouts, const scalar_t* keep, int64_t bi, int64_t bj, int64_t num_words,
    scalar_t scale, const scalar_t* grad, int64_t grad_row_stride) {
  const int64_t row = bj * num_words;
  for (int64_t i = 0; i < bi; ++i) {
    for (int64_t j = 0; j < bj; ++j) {
      scalar_t* e = logits + i * row + j * num_words;
      scalar_t* r = readouts + i * row + j * num_words;
      if (masked_exp_segment(e, keep + j * num_words, num_words, scale) == -std::numeric_limits<scalar_t>::infinity()) {
        std::fill(e, e + num_words, scalar_t(0));
        std::fill(r, r + num_words, scalar_t(0));
        continue;
      }
      scalar_t denom = 0, weighted = 0;
#pragma omp simd reduction(+ : denom, weighted)
      for (int64_t l = 0; l < num_words; ++l) {
        denom += e[l];
        weighted += e[l] * r[l];
      }
      const scalar_t head_out = weighted / denom;
      const scalar_t g_over_denom = grad[i * grad_row_stride + j] / denom;
#pragma omp simd
      for (int64_t l = 0; l < num_words; ++l) {
        const scalar_t g_p = g_over_denom * e[l];
        e[l] = g_p * (r[l] - head_out) * scale;
        r[l] = g_p;
      }
    }
  }
}

MSA_TARGET_CLONES void forward_epilogue_f32(
    float* s, const float* r, const float* keep, int64_t bi, int64_t bj, int64_t L, float scale, float* acc) {
  forward_tile_epilogue<float>(s, r, keep, bi, bj, L, scale, acc);
}

MSA_TARGET_CLONES void backward_epilogue_f32(
    float* s, float* r, const float* keep, int64_t bi, int64_t bj, int64_t L, float scale, const float* grad,
    int64_t grad_stride) {
  backward_tile_epilogue<float>(s, r, keep, bi, bj, L, scale, grad, grad_stride);
}

inline void forward_epilogue(
    float* s, const float* r, const float* keep, int64_t bi, int64_t bj, int64_t L, float scale, float* acc) {
  forward_epilogue_f32(s, r, keep, bi, bj, L, scale, acc);
}
inline void forward_epilogue(
    double* s, const double* r, const double* keep, int64_t bi, int64_t bj, int64_t L, double scale, double* acc) {
  forward_tile_epilogue<double>(s, r, keep, bi, bj, L, scale, acc);
}
inline void backward_epilogue(
    float* s, float* r, const float* keep, int64_t bi, int64_t bj, int64_t L, float scale, const float* grad,
    int64_t grad_stride) {
  backward_epilogue_f32(s, r, keep, bi, bj, L, scale, grad, grad_stride);
}
inline void backward_epilogue(
    double* s, double* r, const double* keep, int64_t bi, int64_t bj, int64_t L, double scale, const double* grad,
    int64_t grad_stride) {
  backward_tile_epilogue<double>(s, r, keep, bi, bj, L, scale, grad, grad_stride);
}

// Rows [first_row, first_row + rows) of head `head` as a [rows, Dh] matrix whose rows are `row_stride` apart:
// q and u are copied head-major ([H, Ni, Dh], row_stride = Dh: cheap, they are small); k and v stay in the
// caller's [Nt * L, H, Dh] layout (row_stride = H * Dh), since copying them costs more memory traffic than the
// strided GEMM operand costs BLAS. from_blob keeps worker threads away from the caller's tensors (and their
// inference-mode or autograd state).
inline at::Tensor image_rows(const void* base, int64_t num_images, int64_t head, int64_t first_row, int64_t rows,
                             int64_t head_dim, const at::TensorOptions& options) {
  const int64_t elem = static_cast<int64_t>(options.dtype().itemsize());
  auto* ptr = static_cast<char*>(const_cast<void*>(base)) + (head * num_images + first_row) * head_dim * elem;
  return at::from_blob(ptr, {rows, head_dim}, options);
}

inline at::Tensor word_rows(const void* base, int64_t heads, int64_t head, int64_t first_row, int64_t rows,
                            int64_t head_dim, const at::TensorOptions& options) {
  const int64_t elem = static_cast<int64_t>(options.dtype().itemsize());
  auto* ptr = static_cast<char*>(const_cast<void*>(base)) + (first_row * heads + head) * head_dim * elem;
  return at::from_blob(ptr, {rows, head_dim}, {heads * head_dim, 1}, options);
}

struct Problem {
  int64_t num_images, num_texts, heads, head_dim, num_words;
};

// Tile sizes: 128 x 512 GEMM outputs run at the BLAS's full rate with K = Dh = 64 and keep S and R (256 KiB
// each in float32) in L2; shrunk until there are two tiles per thread.
inline void choose_tiles(const Problem& p, int64_t& image_block, int64_t& text_block) {
  image_block = 128;
  text_block = std::max<int64_t>(1, 512 / std::max<int64_t>(p.num_words, 1));
  // Two tiles per thread: more, smaller tiles cost more in per-GEMM overhead than they gain in balance.
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  auto tiles = [&] {
    return ((p.num_images + image_block - 1) / image_block) * ((p.num_texts + text_block - 1) / text_block);
  };
  while (tiles() < want && (text_block > 8 || image_block > 16)) {
    if (text_block > 8) {
      text_block /= 2;
    } else {
      image_block /= 2;
    }
  }
}

struct Inputs {
  at::Tensor q, u, k, v, keep;  // keep: [Nt, L] in the compute dtype, 1 = valid word
  Problem p;
};

// Compute-dtype inputs (q, u head-major [H, Ni, Dh]; k, v contiguous [Nt, L, H, Dh]) and the word mask as 0/1
// in the compute dtype, never null.
Inputs prepare(const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& word_mask) {
  TORCH_CHECK(q.dim() == 3 && u.sizes() == q.sizes(), "msa::mscmat_scores: q and u must be [Ni, H, Dh]");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "msa::mscmat_scores: k and v must be [Nt, L, H, Dh]");
  TORCH_CHECK(k.size(2) == q.size(1) && k.size(3) == q.size(2), "msa::mscmat_scores: H and Dh of q and k differ");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(u.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "msa::mscmat_scores: q, u, k, v must share a dtype");
  const auto compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  Inputs in;
  in.p = {q.size(0), k.size(0), q.size(1), q.size(2), k.size(1)};
  const auto images_head_major = [&](const at::Tensor& t) { return t.to(compute).permute({1, 0, 2}).contiguous(); };
  in.q = images_head_major(q);
  in.u = images_head_major(u);
  in.k = k.to(compute).contiguous();
  in.v = v.to(compute).contiguous();
  if (word_mask.has_value()) {
    TORCH_CHECK(word_mask->dim() == 2 && word_mask->size(0) == in.p.num_texts && word_mask->size(1) == in.p.num_words,
                "msa::mscmat_scores: word_mask must be [Nt, L]");
    in.keep = (*word_mask != 0).to(compute).contiguous();
  } else {
    in.keep = at::ones({in.p.num_texts, in.p.num_words}, q.options().dtype(compute));
  }
  return in;
}

template <typename scalar_t>
void forward_impl(const Inputs& in, scalar_t scale, scalar_t* out) {
  const Problem& p = in.p;
  int64_t image_block, text_block;
  choose_tiles(p, image_block, text_block);
  const int64_t image_tiles = (p.num_images + image_block - 1) / image_block;
  const int64_t text_tiles = (p.num_texts + text_block - 1) / text_block;
  const auto options = in.q.options().requires_grad(false);
  const void *q = in.q.data_ptr(), *u = in.u.data_ptr(), *k = in.k.data_ptr(), *v = in.v.data_ptr();
  const scalar_t* keep = in.keep.data_ptr<scalar_t>();
  const int64_t L = p.num_words;

  at::parallel_for(0, image_tiles * text_tiles, 1, [&](int64_t first_tile, int64_t end_tile) {
    std::vector<scalar_t> logits(image_block * text_block * L), readouts(image_block * text_block * L);
    std::vector<scalar_t> acc(image_block * text_block);
    for (int64_t tile = first_tile; tile < end_tile; ++tile) {
      const int64_t i0 = (tile / text_tiles) * image_block, j0 = (tile % text_tiles) * text_block;
      const int64_t bi = std::min(image_block, p.num_images - i0), bj = std::min(text_block, p.num_texts - j0);
      at::Tensor s_tile = at::from_blob(logits.data(), {bi, bj * L}, options);
      at::Tensor r_tile = at::from_blob(readouts.data(), {bi, bj * L}, options);
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t h = 0; h < p.heads; ++h) {
        at::mm_out(s_tile, image_rows(q, p.num_images, h, i0, bi, p.head_dim, options),
                   word_rows(k, p.heads, h, j0 * L, bj * L, p.head_dim, options).t());
        at::mm_out(r_tile, image_rows(u, p.num_images, h, i0, bi, p.head_dim, options),
                   word_rows(v, p.heads, h, j0 * L, bj * L, p.head_dim, options).t());
        forward_epilogue(logits.data(), readouts.data(), keep + j0 * L, bi, bj, L, scale, acc.data());
      }
      for (int64_t i = 0; i < bi; ++i) {
        std::copy(acc.data() + i * bj, acc.data() + (i + 1) * bj, out + (i0 + i) * p.num_texts + j0);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Inputs& in, scalar_t scale, const scalar_t* grad, at::Tensor& dq, at::Tensor& du,
                   at::Tensor& dk, at::Tensor& dv) {
  const Problem& p = in.p;
  int64_t image_block, text_block;
  choose_tiles(p, image_block, text_block);
  const int64_t L = p.num_words;
  const auto options = in.q.options().requires_grad(false);
  const void *q = in.q.data_ptr(), *u = in.u.data_ptr(), *k = in.k.data_ptr(), *v = in.v.data_ptr();
  const scalar_t* keep = in.keep.data_ptr<scalar_t>();

  // Split the images into chunks only when there are fewer heads than threads; each extra chunk then
  // accumulates dk and dv into a private buffer, summed at the end.
  const int64_t threads = at::get_num_threads();
  const int64_t image_tiles = (p.num_images + image_block - 1) / image_block;
  const int64_t wanted_chunks = std::min(image_tiles, std::max<int64_t>(1, (threads + p.heads - 1) / p.heads));
  const int64_t tiles_per_chunk = (image_tiles + wanted_chunks - 1) / wanted_chunks;
  const int64_t chunks = (image_tiles + tiles_per_chunk - 1) / tiles_per_chunk;  // none of them empty
  std::vector<at::Tensor> dk_parts{dk}, dv_parts{dv};
  for (int64_t c = 1; c < chunks; ++c) {
    dk_parts.push_back(at::empty_like(dk));
    dv_parts.push_back(at::empty_like(dv));
  }
  void *dq_ptr = dq.data_ptr(), *du_ptr = du.data_ptr();
  std::vector<void*> dk_ptrs, dv_ptrs;
  for (int64_t c = 0; c < chunks; ++c) {
    dk_ptrs.push_back(dk_parts[c].data_ptr());
    dv_ptrs.push_back(dv_parts[c].data_ptr());
  }

  at::parallel_for(0, p.heads * chunks, 1, [&](int64_t first_item, int64_t end_item) {
    std::vector<scalar_t> logits(image_block * text_block * L), readouts(image_block * text_block * L);
    for (int64_t item = first_item; item < end_item; ++item) {
      const int64_t h = item / chunks, chunk = item % chunks;
      const int64_t first_image = chunk * tiles_per_chunk * image_block;
      const int64_t end_image = std::min(p.num_images, (chunk + 1) * tiles_per_chunk * image_block);
      for (int64_t i0 = first_image; i0 < end_image; i0 += image_block) {
        const int64_t bi = std::min(image_block, end_image - i0);
        at::Tensor q_h = image_rows(q, p.num_images, h, i0, bi, p.head_dim, options);
        at::Tensor u_h = image_rows(u, p.num_images, h, i0, bi, p.head_dim, options);
        at::Tensor dq_h = image_rows(dq_ptr, p.num_images, h, i0, bi, p.head_dim, options);
        at::Tensor du_h = image_rows(du_ptr, p.num_images, h, i0, bi, p.head_dim, options);
        for (int64_t j0 = 0; j0 < p.num_texts; j0 += text_block) {
          const int64_t bj = std::min(text_block, p.num_texts - j0);
          at::Tensor s_tile = at::from_blob(logits.data(), {bi, bj * L}, options);
          at::Tensor r_tile = at::from_blob(readouts.data(), {bi, bj * L}, options);
          at::Tensor k_h = word_rows(k, p.heads, h, j0 * L, bj * L, p.head_dim, options);
          at::Tensor v_h = word_rows(v, p.heads, h, j0 * L, bj * L, p.head_dim, options);
          at::mm_out(s_tile, q_h, k_h.t());
          at::mm_out(r_tile, u_h, v_h.t());
          backward_epilogue(logits.data(), readouts.data(), keep + j0 * L, bi, bj, L, scale,
                            grad + i0 * p.num_texts + j0, p.num_texts);
          // s_tile now holds dS and r_tile holds dR.
          // The gradients start uninitialised: the first tile that reaches a slice writes it (beta = 0, which
          // ignores what was there, NaN included), the later ones accumulate.
          const double dq_beta = j0 == 0 ? 0.0 : 1.0, dk_beta = i0 == first_image ? 0.0 : 1.0;
          dq_h.addmm_(s_tile, k_h, dq_beta);
          du_h.addmm_(r_tile, v_h, dq_beta);
          word_rows(dk_ptrs[chunk], p.heads, h, j0 * L, bj * L, p.head_dim, options).addmm_(s_tile.t(), q_h, dk_beta);
          word_rows(dv_ptrs[chunk], p.heads, h, j0 * L, bj * L, p.head_dim, options).addmm_(r_tile.t(), u_h, dk_beta);
        }
      }
    }
  });
  for (int64_t c = 1; c < chunks; ++c) {
    dk.add_(dk_parts[c]);
    dv.add_(dv_parts[c]);
  }
}

at::Tensor mscmat_scores_cpu(const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& word_mask, double scale) {
  const Inputs in = prepare(q, u, k, v, word_mask);
  at::Tensor scores = at::zeros({in.p.num_images, in.p.num_texts}, in.q.options());
  if (scores.numel() > 0 && in.p.num_words > 0 && in.p.heads > 0) {
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mscmat_scores_cpu", [&] {
      forward_impl<scalar_t>(in, static_cast<scalar_t>(scale), scores.data_ptr<scalar_t>());
    });
  }
  return scores.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mscmat_scores_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& q, const at::Tensor& u, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& word_mask, double scale) {
  const Inputs in = prepare(q, u, k, v, word_mask);
  TORCH_CHECK(grad_scores.dim() == 2 && grad_scores.size(0) == in.p.num_images &&
                  grad_scores.size(1) == in.p.num_texts,
              "msa::mscmat_scores_backward: grad_scores must be [Ni, Nt]");
  const at::Tensor grad = grad_scores.to(in.q.scalar_type()).contiguous();
  const bool any_work = grad.numel() > 0 && in.p.num_words > 0 && in.p.heads > 0;
  // With work to do, every gradient element is written by the tiles (see backward_impl); without, all are 0.
  const auto make = [&](const at::Tensor& like) { return any_work ? at::empty_like(like) : at::zeros_like(like); };
  at::Tensor dq = make(in.q), du = make(in.u), dk = make(in.k), dv = make(in.v);
  if (any_work) {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "mscmat_scores_backward_cpu", [&] {
      backward_impl<scalar_t>(in, static_cast<scalar_t>(scale), grad.data_ptr<scalar_t>(), dq, du, dk, dv);
    });
  }
  // dq and du back from head-major to the callers' layout; dk and dv are in it already.
  const auto dtype = q.scalar_type();
  const auto images_layout = [&](const at::Tensor& t) { return t.permute({1, 0, 2}).to(dtype).contiguous(); };
  return {images_layout(dq), images_layout(du), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(msa, CPU, m) {
  m.impl("mscmat_scores", &mscmat_scores_cpu);
  m.impl("mscmat_scores_backward", &mscmat_scores_backward_cpu);
}

}  // namespace msa
