// Fused CPU kernels of the msa:: scores operators, forward and backward.
//
//   scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
//   p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
//   r[i,j,h,l]  = <u[i,h], v[j,l,h]>
//
// Tiling: the output is cut into tiles of (image block) x (text block). For one tile and one head the
// logits and readouts are two GEMMs computed TRANSPOSED, S^T = K_h (scale Q_h)^T and R^T = V_h U_h^T, each
// [bj * L, bi]: a text's words are rows and the images are contiguous columns. The masked softmax then runs
// down the L rows of a text with the images as vector lanes, so the max, the denominator and the weighted sum
// are plain vertical vector operations (no horizontal reductions per (image, text) pair), and everything happens
// while the tile is in L2. Only valid words get a row: the products shrink with the padding (captions padded to
// 31 tokens are ~55% padding), and a masked word's k and v are never read, whatever they hold. Nothing of size
// Ni * Nt * L is allocated unless the caller asks to keep the softmax: the scratch is bi * bj * L per thread.
//
// Backward turns the tile in place into
//   dS = g * p * (r - o) * scale   and   dR = g * p          (o = sum_l p r, the head's output)
// and accumulates dq += dS K, dk += dS^T Q, du += dR V, dv += dR^T U with up to four more GEMMs (only those of
// the gradients asked for). p and r are either recomputed per tile (two more GEMMs) or read from the
// forward's saved p and p (r - o) scale ([H, Nt, L, Ni], the same transposed layout), when dS and dR are
// just g times them. Work items are (head, image chunk):
// heads never share a gradient slice, so as long as there are at least as many heads as threads, every
// thread writes its own slices and no reduction is needed.
//
// The GEMM (gemm_nn) takes its operands untransposed, so the few that a product needs transposed are turned per
// tile into scratch: (scale Q_h)^T and U_h^T [Dh, bi] for the logits and readouts, K_h^T and V_h^T [Dh, bj L]
// for dq^T += K_h^T dS^T and du^T += V_h^T dR^T (dq and du are summed transposed and turned back once per
// image tile).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "block_cache.h"

// The Fortran BLAS that torch links (MKL or OpenBLAS) exports these. They are called directly because a GEMM
// here is small (~10 MFLOP) and each at::mm_out costs tensor construction and a dispatch on top; weak, so that a
// torch built without them still loads this module and takes the ATen path.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

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

// Images processed side by side by the softmax loops: one AVX-512 register of floats. Scratch rows are padded
// to a multiple of it, so full-width loops never need a remainder.
constexpr int64_t kLanes = 16;
// Images per tile at most (a multiple of kLanes).
constexpr int64_t kMaxImageBlock = 128;

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// exp for float that the compiler can vectorize: e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2,
// and a degree-6 polynomial for e^r (Cephes' expf coefficients, ~1 ulp). NaN stays NaN because the
// clamps compare false on it.
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

// Row-major C[M, N] = A[M, K] B[K, N], plus C when `accumulate`; lda/ldb/ldc are row strides. Without
// `accumulate` whatever C held (NaN included) is ignored. Through the Fortran BLAS (column-major, so it computes
// C^T = B^T A^T), or ATen's addmm where torch exports no BLAS.
template <typename T>
void blas_gemm_nn(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                  bool accumulate, T* c, int64_t ldc) {
  using Fortran = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                           const int*, const T*, const int*, const T*, T*, const int*);
  Fortran blas = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    blas = sgemm_;
  } else {
    blas = dgemm_;
  }
  const T one = 1, beta = accumulate ? 1 : 0;
  if (blas != nullptr) {
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    blas("N", "N", &in, &im, &ik, &one, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  // from_blob keeps worker threads away from the caller's tensors (and their inference-mode or autograd state).
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto matrix = [&](const T* data, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = matrix(c, m, n, ldc);
  out.addmm_(matrix(a, m, k, lda), matrix(b, k, n, ldb), beta, 1);
}

// The GEMM of every product here: float goes to ATen's brgemm, which on x86-64 is oneDNN's batch-reduce GEMM
// micro-kernel, generated once per shape and thread. At these sizes it runs ~20% faster than MKL's sgemm (~112 vs
// ~94 GFLOP/s on one Zen 4 core, M x N x K = 512 x 128 x 64) because it reads A and B in place instead of packing
// them and writes C instead of clearing it first. It takes no transposes, which is why every operand here is laid
// out for A B. (Without oneDNN, brgemm itself falls back to the BLAS.)
inline void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    bool accumulate, float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
#else
  blas_gemm_nn(m, n, k, a, lda, b, ldb, accumulate, c, ldc);
#endif
}

inline void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                    bool accumulate, double* c, int64_t ldc) {
  blas_gemm_nn(m, n, k, a, lda, b, ldb, accumulate, c, ldc);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSA_HAS_AVX2_TRANSPOSE 1
// dst[c, r] = src[r, c] for one 8 x 8 block of floats, in registers: pairs of rows interleaved (unpack), then
// pairs of pairs (shuffle), then the 128-bit halves swapped across rows four apart (permute2f128).
__attribute__((target("avx2"))) void transpose_8x8_avx2(const float* src, int64_t src_ld, float* dst,
                                                         int64_t dst_ld) {
  __m256 row[8], pair[8], quad[8];
  for (int r = 0; r < 8; ++r) {
    row[r] = _mm256_loadu_ps(src + r * src_ld);
  }
  for (int r = 0; r < 8; r += 2) {
    pair[r] = _mm256_unpacklo_ps(row[r], row[r + 1]);
    pair[r + 1] = _mm256_unpackhi_ps(row[r], row[r + 1]);
  }
  for (int r = 0; r < 8; r += 4) {
    quad[r] = _mm256_shuffle_ps(pair[r], pair[r + 2], _MM_SHUFFLE(1, 0, 1, 0));
    quad[r + 1] = _mm256_shuffle_ps(pair[r], pair[r + 2], _MM_SHUFFLE(3, 2, 3, 2));
    quad[r + 2] = _mm256_shuffle_ps(pair[r + 1], pair[r + 3], _MM_SHUFFLE(1, 0, 1, 0));
    quad[r + 3] = _mm256_shuffle_ps(pair[r + 1], pair[r + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * dst_ld, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * dst_ld, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x31));
  }
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// dst[c, r] = src[r, c] for a rows x cols block; row strides src_ld and dst_ld. It turns the operands that a
// product needs transposed (brgemm takes none); in 8 x 8 register blocks where AVX2 exists, as a plain loop
// (~4 cycles an element) it would cost a sixth of the backward.
template <typename T>
void transpose_block(const T* src, int64_t rows, int64_t cols, int64_t src_ld, T* dst, int64_t dst_ld) {
  int64_t full_rows = 0, full_cols = 0;
#ifdef MSA_HAS_AVX2_TRANSPOSE
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) {
      full_rows = rows / 8 * 8;
      full_cols = cols / 8 * 8;
      for (int64_t r = 0; r < full_rows; r += 8) {
        for (int64_t c = 0; c < full_cols; c += 8) {
          transpose_8x8_avx2(src + r * src_ld + c, src_ld, dst + c * dst_ld + r, dst_ld);
        }
      }
    }
  }
#endif
  // What the blocks left: the last rows (all columns), and the last columns of the blocked rows.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) {
      dst[c * dst_ld + r] = src[r * src_ld + c];
    }
  }
}

// One tile: bi images x bj texts of num_words positions each. Only the valid words get a row in the tile's
// products ([rows, ld] with ld = bi rounded up to kLanes): text j's rows are first_row(j) .. + num_rows(j), and
// words(j)[r] is the position l of its r-th row. row_begin and word_of are the call's lists (Inputs), row_begin
// offset to the tile's first text.
struct TileShape {
  int64_t bi, bj, num_words, ld;
  double scale;
  const int64_t* row_begin;  // [bj + 1]
  const int32_t* word_of;    // indexed by the call's row numbers

  int64_t rows() const {
    return row_begin[bj] - row_begin[0];
  }
  int64_t first_row(int64_t j) const {
    return row_begin[j] - row_begin[0];
  }
  int64_t num_rows(int64_t j) const {
    return row_begin[j + 1] - row_begin[j];
  }
  const int32_t* words(int64_t j) const {
    return word_of + row_begin[j];
  }
  // Every word valid: the products can read the words' keys and values in place.
  bool all_words() const {
    return rows() == bj * num_words;
  }
};

// The softmax of one text for kLanes images over its num_rows valid words: returns the denominator sum_l e_l and
// the weighted sum sum_l e_l r_l with e_l = exp(s_l - max) (s already holds scale * <q, k>). kStore writes e over
// s. A NaN logit makes its images' sums NaN (the max skips it, the exp does not), as torch's softmax does.
template <typename T, bool kStore>
MSA_ALWAYS_INLINE void text_softmax(T* s, const T* r, int64_t ld, int64_t num_rows, T* denom, T* weighted) {
  T row_max[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    row_max[t] = -std::numeric_limits<T>::infinity();
  }
  for (int64_t l = 0; l < num_rows; ++l) {
    const T* s_row = s + l * ld;
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) {
      row_max[t] = s_row[t] > row_max[t] ? s_row[t] : row_max[t];
    }
  }
  T den[kLanes] = {}, sum[kLanes] = {};
  for (int64_t l = 0; l < num_rows; ++l) {
    T* s_row = s + l * ld;
    const T* r_row = r + l * ld;
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) {
      const T e = exp_approx(s_row[t] - row_max[t]);
      if constexpr (kStore) {
        s_row[t] = e;
      }
      den[t] += e;
      sum[t] += e * r_row[t];
    }
  }
  std::copy(den, den + kLanes, denom);
  std::copy(sum, sum + kLanes, weighted);
}

// What a text's softmax feeds, row by row for n images side by side: weight = factor e and
// weighted = weight (r - o) scale, from the unnormalised softmax e and the readouts r (row stride in_ld) into
// rows of stride out_ld: row out_rows[k] for input row k, or row k without out_rows. factor = 1 / denominator
// gives p and p (r - o) scale, what the forward keeps; factor = g / denominator gives dR and dS. Each element is
// read before it is written, so the outputs may be the inputs.
template <typename T>
MSA_ALWAYS_INLINE void softmax_rows(const T* e, const T* r, int64_t in_ld, T* weight, T* weighted, int64_t out_ld,
                                    const int32_t* out_rows, int64_t num_rows, int64_t n, const T* factor,
                                    const T* head_out, T scale) {
  for (int64_t k = 0; k < num_rows; ++k) {
    const int64_t out_row = out_rows == nullptr ? k : out_rows[k];
    T* weight_row = weight + out_row * out_ld;
    T* weighted_row = weighted + out_row * out_ld;
    const T* e_row = e + k * in_ld;
    const T* r_row = r + k * in_ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T w = factor[i] * e_row[i];
      const T readout = r_row[i];
      weight_row[i] = w;
      weighted_row[i] = w * (readout - head_out[i]) * scale;
    }
  }
}

// Zeroes the rows of a text's kept p and a (num_words rows of stride out_ld, n images) at its masked words: the
// positions missing from the ascending list words[0 .. num_rows).
template <typename T>
MSA_ALWAYS_INLINE void zero_masked_rows(T* probs, T* logit_grads, int64_t out_ld, const int32_t* words,
                                        int64_t num_rows, int64_t num_words, int64_t n) {
  for (int64_t l = 0, k = 0; l < num_words; ++l) {
    if (k < num_rows && words[k] == l) {
      ++k;
      continue;
    }
    std::fill(probs + l * out_ld, probs + l * out_ld + n, T(0));
    std::fill(logit_grads + l * out_ld, logit_grads + l * out_ld + n, T(0));
  }
}

// Forward epilogue of one tile and head: acc[j, i] += sum_l softmax(S)[l, i] R[l, i] for every text j of the
// tile. With `probs`/`logit_grads` ([bj, L] rows of stride out_ld) it also writes there what the backward needs, 0
// at masked words: p and a = p (r - o) scale, so that dS = g a and dR = g p. Those are written a whole row of
// images at a time, once the softmax of every lane group is known: full rows stream to memory, strided pieces
// would not.
template <typename T>
MSA_ALWAYS_INLINE void forward_epilogue_impl(T* s, const T* r, const TileShape& tile, T* acc, T* probs,
                                             T* logit_grads, int64_t out_ld) {
  const int64_t L = tile.num_words, ld = tile.ld, bi = tile.bi;
  const T scale = static_cast<T>(tile.scale);
  T inv_den[kMaxImageBlock], head_out[kMaxImageBlock];  // per image of text j: 1 / denominator and o
  for (int64_t j = 0; j < tile.bj; ++j) {
    const int64_t num_rows = tile.num_rows(j);
    T* s_j = s + tile.first_row(j) * ld;
    const T* r_j = r + tile.first_row(j) * ld;
    if (num_rows > 0) {  // a text without a valid word scores 0 (and keeps rows of zeros)
      for (int64_t c = 0; c < bi; c += kLanes) {
        T den[kLanes], sum[kLanes];
        if (probs != nullptr) {
          text_softmax<T, true>(s_j + c, r_j + c, ld, num_rows, den, sum);
        } else {
          text_softmax<T, false>(s_j + c, r_j + c, ld, num_rows, den, sum);
        }
        T* acc_j = acc + j * ld + c;
#pragma omp simd
        for (int64_t t = 0; t < kLanes; ++t) {
          acc_j[t] += sum[t] / den[t];
        }
        if (probs != nullptr) {
#pragma omp simd
          for (int64_t t = 0; t < kLanes; ++t) {
            // One division per lane, not two per word.
            inv_den[c + t] = T(1) / den[t];
            head_out[c + t] = sum[t] * inv_den[c + t];
          }
        }
      }
    }
    if (probs != nullptr) {
      T* probs_j = probs + j * L * out_ld;
      T* logit_grads_j = logit_grads + j * L * out_ld;
      softmax_rows(s_j, r_j, ld, probs_j, logit_grads_j, out_ld, tile.words(j), num_rows, bi, inv_den, head_out,
                   scale);
      zero_masked_rows(probs_j, logit_grads_j, out_ld, tile.words(j), num_rows, L, bi);
    }
  }
}

// Backward epilogue of one tile and head: s and r become dS^T and dR^T in place. `grad` is the tile's
// gradient transposed, [bj, ld]. With `probs`/`logit_grads` (the forward's saved p and a, [bj, L] rows of stride
// saved_ld) s and r are only written, never read: dS = g a, dR = g p.
template <typename T>
MSA_ALWAYS_INLINE void backward_epilogue_impl(T* s, T* r, const TileShape& tile, T scale, const T* grad,
                                              const T* probs, const T* logit_grads, int64_t saved_ld) {
  const int64_t L = tile.num_words, ld = tile.ld;
  for (int64_t j = 0; j < tile.bj; ++j) {
    const int64_t num_rows = tile.num_rows(j);
    T* s_j = s + tile.first_row(j) * ld;
    T* r_j = r + tile.first_row(j) * ld;
    if (probs != nullptr) {  // whole rows of images: the saved p and a stream in
      const T* g = grad + j * ld;
      const int32_t* words = tile.words(j);
      for (int64_t k = 0; k < num_rows; ++k) {
        const T* p_row = probs + (j * L + words[k]) * saved_ld;
        const T* a_row = logit_grads + (j * L + words[k]) * saved_ld;
        T* ds_row = s_j + k * ld;
        T* dr_row = r_j + k * ld;
#pragma omp simd
        for (int64_t i = 0; i < tile.bi; ++i) {
          ds_row[i] = g[i] * a_row[i];
          dr_row[i] = g[i] * p_row[i];
        }
      }
      continue;
    }
    if (num_rows == 0) {
      continue;
    }
    for (int64_t c = 0; c < tile.bi; c += kLanes) {
      const T* g = grad + j * ld + c;
      T den[kLanes], sum[kLanes], g_over_denom[kLanes], head_out[kLanes];
      text_softmax<T, true>(s_j + c, r_j + c, ld, num_rows, den, sum);
#pragma omp simd
      for (int64_t t = 0; t < kLanes; ++t) {
        const T inv_denom = T(1) / den[t];
        g_over_denom[t] = g[t] * inv_denom;
        head_out[t] = sum[t] * inv_denom;
      }
      // In place: dR over r, dS over the softmax.
      softmax_rows(s_j + c, r_j + c, ld, r_j + c, s_j + c, ld, nullptr, num_rows, kLanes, g_over_denom, head_out,
                   scale);
    }
  }
}

MSA_TARGET_CLONES void forward_epilogue_f32(float* s, const float* r, const TileShape& tile, float* acc, float* probs,
                                            float* logit_grads, int64_t out_ld) {
  forward_epilogue_impl<float>(s, r, tile, acc, probs, logit_grads, out_ld);
}

MSA_TARGET_CLONES void backward_epilogue_f32(float* s, float* r, const TileShape& tile, float scale,
                                             const float* grad, const float* probs, const float* logit_grads,
                                             int64_t saved_ld) {
  backward_epilogue_impl<float>(s, r, tile, scale, grad, probs, logit_grads, saved_ld);
}

inline void forward_epilogue(float* s, const float* r, const TileShape& tile, float* acc, float* probs,
                             float* logit_grads, int64_t out_ld) {
  forward_epilogue_f32(s, r, tile, acc, probs, logit_grads, out_ld);
}
inline void forward_epilogue(double* s, const double* r, const TileShape& tile, double* acc, double* probs,
                             double* logit_grads, int64_t out_ld) {
  forward_epilogue_impl<double>(s, r, tile, acc, probs, logit_grads, out_ld);
}
inline void backward_epilogue(float* s, float* r, const TileShape& tile, float scale, const float* grad,
                              const float* probs, const float* logit_grads, int64_t saved_ld) {
  backward_epilogue_f32(s, r, tile, scale, grad, probs, logit_grads, saved_ld);
}
inline void backward_epilogue(double* s, double* r, const TileShape& tile, double scale, const double* grad,
                              const double* probs, const double* logit_grads, int64_t saved_ld) {
  backward_epilogue_impl<double>(s, r, tile, scale, grad, probs, logit_grads, saved_ld);
}

struct Problem {
  int64_t num_images, num_texts, heads, head_dim, num_words;
};

// Runs items [0, num_items) on ATen's threads, each thread taking the next item when it finishes one, so that a
// thread the OS preempts (a shared machine) holds up one item rather than a fixed share of them. make_worker()
// runs once per thread and returns the function that does one item (owning that thread's scratch).
template <typename MakeWorker>
void for_each_item(int64_t num_items, const MakeWorker& make_worker) {
  std::atomic<int64_t> next_item{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto work = make_worker();
    for (int64_t item = next_item++; item < num_items; item = next_item++) {
      work(item);
    }
  });
}

// Tile sizes: 128 images x 512 word positions run the GEMMs at their full rate with K = Dh = 64 and keep S and R
// (256 KiB each in float32) in L2; shrunk until there are two tiles per thread. With padding the tiles hold fewer
// rows (only valid words); sizing them by valid words instead was measured: no faster.
inline void choose_tiles(const Problem& p, int64_t& image_block, int64_t& text_block) {
  image_block = kMaxImageBlock;
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
  at::Tensor q, u, k, v;  // q, u head-major [H, Ni, Dh]; k, v contiguous [Nt, L, H, Dh]
  at::Tensor q_logits;    // scale * q, head-major: the logits' GEMM then needs no epilogue multiply
  double scale;
  // The valid words, numbered text by text: text j's are rows row_begin[j] .. row_begin[j + 1], word_of[row] the
  // position l of each. Masked words get no row: no product reads their k and v, whatever they hold.
  std::vector<int64_t> row_begin;
  std::vector<int32_t> word_of;
  std::vector<int64_t> masked_words;  // j * L + l of every masked word
  Problem p;
};

template <typename T>
void zero_rows(T* data, const std::vector<int64_t>& rows, int64_t row_size) {
  for (const int64_t row : rows) {
    std::fill(data + row * row_size, data + (row + 1) * row_size, T(0));
  }
}

// Inputs in the compute dtype and layout, and the word lists of the mask (None: every word valid).
Inputs prepare(const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& word_mask, double scale) {
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
  in.q_logits = in.q * scale;
  in.scale = scale;
  in.k = k.to(compute).contiguous();
  in.v = v.to(compute).contiguous();
  at::Tensor valid;
  if (word_mask.has_value()) {
    TORCH_CHECK(word_mask->dim() == 2 && word_mask->size(0) == in.p.num_texts && word_mask->size(1) == in.p.num_words,
                "msa::mscmat_scores: word_mask must be [Nt, L]");
    valid = (*word_mask != 0).to(at::kCPU).contiguous();
  }
  const bool* is_valid = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  in.row_begin.reserve(in.p.num_texts + 1);
  in.row_begin.push_back(0);
  for (int64_t j = 0; j < in.p.num_texts; ++j) {
    for (int64_t l = 0; l < in.p.num_words; ++l) {
      if (is_valid == nullptr || is_valid[j * in.p.num_words + l]) {
        in.word_of.push_back(static_cast<int32_t>(l));
      } else {
        in.masked_words.push_back(j * in.p.num_words + l);
      }
    }
    in.row_begin.push_back(static_cast<int64_t>(in.word_of.size()));
  }
  return in;
}

// What the forward keeps for the backward, [H, Nt, L, Ni] each in the compute dtype (null when not kept): the
// softmax p and a = p (r - o) scale, the score's derivative with respect to the unscaled logit <q, k>.
struct Saved {
  void* probs = nullptr;
  void* logit_grads = nullptr;
};

// One head's keys (or values) of a tile's valid words as the A operand of its products, [rows, Dh] with row
// stride *ld: read in place when every word is valid, else packed into `packed` row by row.
template <typename T>
const T* tile_words(const T* words, const Problem& p, const TileShape& tile, int64_t j0, int64_t h, T* packed,
                    int64_t* ld) {
  const int64_t D = p.head_dim, word_stride = p.heads * D, L = p.num_words;
  const T* first = words + j0 * L * word_stride + h * D;
  if (tile.all_words()) {
    *ld = word_stride;
    return first;
  }
  *ld = D;
  for (int64_t j = 0; j < tile.bj; ++j) {
    const int32_t* positions = tile.words(j);
    T* out = packed + tile.first_row(j) * D;
    for (int64_t k = 0; k < tile.num_rows(j); ++k) {
      std::copy_n(first + (j * L + positions[k]) * word_stride, D, out + k * D);
    }
  }
  return packed;
}

// The rows of a tile's word gradient ([rows, Dh], packed) written (or added, with `add`) to their words'
// rows of one head of dk or dv ([Nt, L, H, Dh]); the inverse of tile_words.
template <typename T>
void scatter_word_rows(const T* packed, const Problem& p, const TileShape& tile, int64_t j0, int64_t h, bool add,
                       T* grad) {
  const int64_t D = p.head_dim, word_stride = p.heads * D, L = p.num_words;
  T* first = grad + j0 * L * word_stride + h * D;
  for (int64_t j = 0; j < tile.bj; ++j) {
    const int32_t* positions = tile.words(j);
    const T* rows = packed + tile.first_row(j) * D;
    for (int64_t k = 0; k < tile.num_rows(j); ++k) {
      T* out = first + (j * L + positions[k]) * word_stride;
      const T* row = rows + k * D;
      if (add) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          out[d] += row[d];
        }
      } else {
        std::copy_n(row, D, out);
      }
    }
  }
}

// One image tile of one head, turned into the B operands of the tile's products: (scale q)^T and u^T, [Dh, bi]
// with row stride ld.
template <typename T>
void image_columns(const Inputs& in, int64_t h, int64_t i0, int64_t bi, int64_t ld, T* q_logits_t, T* u_t) {
  const int64_t D = in.p.head_dim, offset = (h * in.p.num_images + i0) * D;
  transpose_block(in.q_logits.data_ptr<T>() + offset, bi, D, D, q_logits_t, ld);
  transpose_block(in.u.data_ptr<T>() + offset, bi, D, D, u_t, ld);
}

template <typename T>
void forward_impl(const Inputs& in, T* out, const Saved& saved) {
  const Problem& p = in.p;
  int64_t image_block, text_block;
  choose_tiles(p, image_block, text_block);
  const int64_t image_tiles = (p.num_images + image_block - 1) / image_block;
  const int64_t text_tiles = (p.num_texts + text_block - 1) / text_block;
  const T *k = in.k.data_ptr<T>(), *v = in.v.data_ptr<T>();
  const int64_t L = p.num_words, D = p.head_dim;
  const int64_t max_ld = round_up(image_block, kLanes), max_rows = text_block * L;
  T* probs = static_cast<T*>(saved.probs);
  T* logit_grads = static_cast<T*>(saved.logit_grads);

  for_each_item(image_tiles * text_tiles, [&] {
    return [&, logits = std::vector<T>(max_rows * max_ld), reads = std::vector<T>(max_rows * max_ld),
            acc = std::vector<T>(text_block * max_ld), q_t = std::vector<T>(D * max_ld),
            u_t = std::vector<T>(D * max_ld), keys = std::vector<T>(max_rows * D),
            values = std::vector<T>(max_rows * D)](int64_t tile_index) mutable {
      // Text-major order: consecutive tiles of a thread share their text tile, so its k and v (the large
      // operands at test-split sizes) come from cache for every image tile after the first.
      const int64_t j0 = (tile_index / image_tiles) * text_block, i0 = (tile_index % image_tiles) * image_block;
      const int64_t bi = std::min(image_block, p.num_images - i0), bj = std::min(text_block, p.num_texts - j0);
      const TileShape tile{bi, bj, L, round_up(bi, kLanes), in.scale, in.row_begin.data() + j0, in.word_of.data()};
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t h = 0; h < p.heads; ++h) {
        if (tile.rows() > 0) {
          int64_t keys_ld, values_ld;
          const T* tile_keys = tile_words(k, p, tile, j0, h, keys.data(), &keys_ld);
          const T* tile_values = tile_words(v, p, tile, j0, h, values.data(), &values_ld);
          image_columns(in, h, i0, bi, tile.ld, q_t.data(), u_t.data());
          gemm_nn(tile.rows(), bi, D, tile_keys, keys_ld, q_t.data(), tile.ld, false, logits.data(), tile.ld);
          gemm_nn(tile.rows(), bi, D, tile_values, values_ld, u_t.data(), tile.ld, false, reads.data(), tile.ld);
        }
        const int64_t saved_offset = (h * p.num_texts + j0) * L * p.num_images + i0;
        forward_epilogue(logits.data(), reads.data(), tile, acc.data(),
                         probs == nullptr ? nullptr : probs + saved_offset,
                         logit_grads == nullptr ? nullptr : logit_grads + saved_offset, p.num_images);
      }
      for (int64_t i = 0; i < bi; ++i) {
        for (int64_t j = 0; j < bj; ++j) {
          out[(i0 + i) * p.num_texts + j0 + j] = acc[j * tile.ld + i];
        }
      }
    };
  });
}

// Which of dq, du, dk, dv to compute (head-major dq/du [H, Ni, Dh]; dk/dv [Nt, L, H, Dh]); undefined = not asked.
struct Grads {
  at::Tensor dq, du, dk, dv;
};

template <typename T>
void backward_impl(const Inputs& in, T scale, const T* grad, const Saved& saved, Grads& grads) {
  const Problem& p = in.p;
  int64_t image_block, text_block;
  choose_tiles(p, image_block, text_block);
  const int64_t L = p.num_words, D = p.head_dim, word_stride = p.heads * D;
  const T *q = in.q.data_ptr<T>(), *u = in.u.data_ptr<T>(), *k = in.k.data_ptr<T>(), *v = in.v.data_ptr<T>();
  const T* probs = static_cast<const T*>(saved.probs);
  const T* logit_grads = static_cast<const T*>(saved.logit_grads);
  const int64_t max_ld = round_up(image_block, kLanes), max_rows = text_block * L;

  // Split the images into chunks only when there are fewer heads than threads; each extra chunk then
  // accumulates dk and dv into a private buffer, summed at the end.
  const int64_t threads = at::get_num_threads();
  const int64_t image_tiles = (p.num_images + image_block - 1) / image_block;
  const int64_t wanted_chunks = std::min(image_tiles, std::max<int64_t>(1, (threads + p.heads - 1) / p.heads));
  const int64_t tiles_per_chunk = (image_tiles + wanted_chunks - 1) / wanted_chunks;
  const int64_t chunks = (image_tiles + tiles_per_chunk - 1) / tiles_per_chunk;  // none of them empty
  const auto parts_of = [&](const at::Tensor& full) {
    std::vector<at::Tensor> parts{full};
    for (int64_t c = 1; c < chunks && full.defined(); ++c) {
      parts.push_back(empty_from_block_cache(full.sizes(), full.scalar_type()));
    }
    std::vector<T*> pointers;
    for (auto& part : parts) {
      pointers.push_back(part.defined() ? part.data_ptr<T>() : nullptr);
    }
    return std::make_pair(parts, pointers);
  };
  auto [dk_parts, dk_ptrs] = parts_of(grads.dk);
  auto [dv_parts, dv_ptrs] = parts_of(grads.dv);
  T* dq = grads.dq.defined() ? grads.dq.data_ptr<T>() : nullptr;
  T* du = grads.du.defined() ? grads.du.data_ptr<T>() : nullptr;

  for_each_item(p.heads * chunks, [&] {
    return [&, ds = std::vector<T>(max_rows * max_ld), dr = std::vector<T>(max_rows * max_ld),
            grad_t = std::vector<T>(text_block * max_ld), q_t = std::vector<T>(D * max_ld),
            u_t = std::vector<T>(D * max_ld), keys = std::vector<T>(max_rows * D),
            values = std::vector<T>(max_rows * D), words_t = std::vector<T>(D * max_rows),
            word_grads = std::vector<T>(max_rows * D), dq_t = std::vector<T>(D * max_ld),
            du_t = std::vector<T>(D * max_ld)](int64_t item) mutable {
      const int64_t h = item / chunks, chunk = item % chunks;
      const int64_t first_image = chunk * tiles_per_chunk * image_block;
      const int64_t end_image = std::min(p.num_images, (chunk + 1) * tiles_per_chunk * image_block);
      for (int64_t i0 = first_image; i0 < end_image; i0 += image_block) {
        const int64_t bi = std::min(image_block, end_image - i0), image_offset = (h * p.num_images + i0) * D;
        const int64_t ld = round_up(bi, kLanes);
        if (probs == nullptr) {
          image_columns(in, h, i0, bi, ld, q_t.data(), u_t.data());
        }
        bool image_sums_started = false;  // dq_t and du_t hold a first product
        for (int64_t j0 = 0; j0 < p.num_texts; j0 += text_block) {
          const int64_t bj = std::min(text_block, p.num_texts - j0);
          const TileShape tile{bi, bj, L, ld, in.scale, in.row_begin.data() + j0, in.word_of.data()};
          const int64_t rows = tile.rows();
          if (rows == 0) {  // no valid word: no gradient flows through these texts
            continue;
          }
          for (int64_t j = 0; j < bj; ++j) {
            for (int64_t i = 0; i < bi; ++i) {
              grad_t[j * ld + i] = grad[(i0 + i) * p.num_texts + j0 + j];
            }
          }
          int64_t keys_ld, values_ld;
          const T* tile_keys = tile_words(k, p, tile, j0, h, keys.data(), &keys_ld);
          const T* tile_values = tile_words(v, p, tile, j0, h, values.data(), &values_ld);
          const T *tile_probs = nullptr, *tile_logit_grads = nullptr;
          if (probs != nullptr) {
            const int64_t saved_offset = (h * p.num_texts + j0) * L * p.num_images + i0;
            tile_probs = probs + saved_offset;
            tile_logit_grads = logit_grads + saved_offset;
          } else {
            gemm_nn(rows, bi, D, tile_keys, keys_ld, q_t.data(), ld, false, ds.data(), ld);
            gemm_nn(rows, bi, D, tile_values, values_ld, u_t.data(), ld, false, dr.data(), ld);
          }
          backward_epilogue(ds.data(), dr.data(), tile, scale, grad_t.data(), tile_probs, tile_logit_grads,
                            p.num_images);
          // dq and du of the image tile are summed over the text tiles transposed, [Dh, bi], from the words'
          // keys (values) turned into [Dh, rows]; dk and dv take dS and dR as they are. The first product into
          // each sum overwrites it: the gradients start uninitialised (NaN included).
          if (dq != nullptr) {
            transpose_block(tile_keys, rows, D, keys_ld, words_t.data(), rows);
            gemm_nn(D, bi, rows, words_t.data(), rows, ds.data(), ld, image_sums_started, dq_t.data(), ld);
          }
          if (du != nullptr) {
            transpose_block(tile_values, rows, D, values_ld, words_t.data(), rows);
            gemm_nn(D, bi, rows, words_t.data(), rows, dr.data(), ld, image_sums_started, du_t.data(), ld);
          }
          image_sums_started = true;
          // dk (dv) at the tile's valid words: straight into the gradient when every word is valid, else through
          // packed rows scattered back to their words.
          const bool add_to_words = i0 != first_image;
          const auto word_product = [&](const T* weights, const T* images, T* word_grad) {
            if (word_grad == nullptr) {
              return;
            }
            if (tile.all_words()) {
              gemm_nn(rows, D, bi, weights, ld, images, D, add_to_words, word_grad + j0 * L * word_stride + h * D,
                      word_stride);
            } else {
              gemm_nn(rows, D, bi, weights, ld, images, D, false, word_grads.data(), D);
              scatter_word_rows(word_grads.data(), p, tile, j0, h, add_to_words, word_grad);
            }
          };
          word_product(ds.data(), q + image_offset, dk_ptrs[chunk]);
          word_product(dr.data(), u + image_offset, dv_ptrs[chunk]);
        }
        for (auto [sum, image_grad] : {std::make_pair(dq_t.data(), dq), std::make_pair(du_t.data(), du)}) {
          if (image_grad == nullptr) {
            continue;
          }
          if (image_sums_started) {
            transpose_block(sum, D, bi, ld, image_grad + image_offset, D);
          } else {  // every text of the call without a valid word
            std::fill(image_grad + image_offset, image_grad + image_offset + bi * D, T(0));
          }
        }
      }
    };
  });
  for (int64_t c = 1; c < chunks; ++c) {
    if (grads.dk.defined()) {
      grads.dk.add_(dk_parts[c]);
    }
    if (grads.dv.defined()) {
      grads.dv.add_(dv_parts[c]);
    }
  }
}

bool has_work(const Problem& p) {
  return p.num_images > 0 && p.num_texts > 0 && p.num_words > 0 && p.heads > 0 && p.head_dim > 0;
}

// scores [Ni, Nt] (in q's dtype) and, when keep_softmax, the softmax p and a = p (r - o) scale, [H, Nt, L, Ni]
// in the compute dtype (float32, or float64 for float64 inputs); otherwise two empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scores_forward(const at::Tensor& q, const at::Tensor& u,
                                                              const at::Tensor& k, const at::Tensor& v,
                                                              const std::optional<at::Tensor>& word_mask,
                                                              double scale, bool keep_softmax) {
  const Inputs in = prepare(q, u, k, v, word_mask, scale);
  const Problem& p = in.p;
  at::Tensor scores = at::zeros({p.num_images, p.num_texts}, in.q.options());
  const std::vector<int64_t> saved_shape =
      keep_softmax ? std::vector<int64_t>{p.heads, p.num_texts, p.num_words, p.num_images} : std::vector<int64_t>{0};
  // Every element of probs and logit_grads is written by the tiles (0 at masked words and texts without one).
  const auto make_saved = [&] {
    return has_work(p) ? empty_from_block_cache(saved_shape, in.q.scalar_type())
                       : at::zeros(saved_shape, in.q.options());
  };
  at::Tensor probs = make_saved(), logit_grads = make_saved();
  if (has_work(p)) {
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mscmat_scores_cpu", [&] {
      const Saved saved{keep_softmax ? probs.data_ptr() : nullptr, keep_softmax ? logit_grads.data_ptr() : nullptr};
      forward_impl<scalar_t>(in, scores.data_ptr<scalar_t>(), saved);
    });
  }
  return {scores.to(q.scalar_type()), probs, logit_grads};
}

// dq, du, dk, dv in the inputs' dtype and layout; a gradient not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scores_backward(
    const at::Tensor& grad_scores, const at::Tensor& q, const at::Tensor& u, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& word_mask, const at::Tensor& probs,
    const at::Tensor& logit_grads, double scale, std::array<bool, 4> needs) {
  const Inputs in = prepare(q, u, k, v, word_mask, scale);
  const Problem& p = in.p;
  TORCH_CHECK(grad_scores.dim() == 2 && grad_scores.size(0) == p.num_images && grad_scores.size(1) == p.num_texts,
              "msa::mscmat_scores_backward: grad_scores must be [Ni, Nt]");
  const bool from_saved = probs.numel() > 0;
  if (from_saved) {
    const std::vector<int64_t> shape{p.heads, p.num_texts, p.num_words, p.num_images};
    TORCH_CHECK(probs.sizes() == shape && logit_grads.sizes() == shape && probs.scalar_type() == in.q.scalar_type() &&
                    logit_grads.scalar_type() == in.q.scalar_type() && probs.is_contiguous() &&
                    logit_grads.is_contiguous(),
                "msa::mscmat_scores_for_grad_backward: probs and logit_grads must be the forward's [H, Nt, L, Ni]");
  }
  const at::Tensor grad = grad_scores.to(in.q.scalar_type()).contiguous();
  const bool any_work = has_work(p);
  // With work to do, the tiles write every element of dq and du and the valid words' rows of dk and dv (finish
  // below zeroes the masked words'); without, all are 0.
  const auto make = [&](bool needed, const at::Tensor& like) {
    if (!needed) {
      return at::Tensor();
    }
    return any_work ? empty_from_block_cache(like.sizes(), like.scalar_type()) : at::zeros_like(like);
  };
  Grads grads{make(needs[0], in.q), make(needs[1], in.u), make(needs[2], in.k), make(needs[3], in.v)};
  if (any_work && (needs[0] || needs[1] || needs[2] || needs[3])) {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "mscmat_scores_backward_cpu", [&] {
      const Saved saved{from_saved ? probs.data_ptr() : nullptr, from_saved ? logit_grads.data_ptr() : nullptr};
      backward_impl<scalar_t>(in, static_cast<scalar_t>(scale), grad.data_ptr<scalar_t>(), saved, grads);
    });
  }
  const auto dtype = q.scalar_type();
  const auto finish = [&](const at::Tensor& g, bool images) {
    if (!g.defined()) {
      return at::empty({0}, q.options());
    }
    if (images) {  // back from head-major to the callers' layout
      return g.permute({1, 0, 2}).to(dtype).contiguous();
    }
    // A masked word has no row in the products, so nothing wrote its rows of dk and dv: its gradient is 0.
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mscmat_scores_backward_cpu", [&] {
      zero_rows(g.data_ptr<scalar_t>(), in.masked_words, p.heads * p.head_dim);
    });
    return g.to(dtype);
  };
  return {finish(grads.dq, true), finish(grads.du, true), finish(grads.dk, false), finish(grads.dv, false)};
}

at::Tensor mscmat_scores_cpu(const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& word_mask, double scale) {
  return std::get<0>(scores_forward(q, u, k, v, word_mask, scale, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mscmat_scores_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& q, const at::Tensor& u, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& word_mask, double scale, std::array<bool, 4> needs_grad) {
  const at::Tensor none = at::empty({0}, q.options());
  return scores_backward(grad_scores, q, u, k, v, word_mask, none, none, scale, needs_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mscmat_scores_for_grad_cpu(
    const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& word_mask, double scale, bool keep_softmax) {
  return scores_forward(q, u, k, v, word_mask, scale, keep_softmax);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mscmat_scores_for_grad_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& q, const at::Tensor& u, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& word_mask, const at::Tensor& probs,
    const at::Tensor& logit_grads, double scale, std::array<bool, 4> needs_grad) {
  return scores_backward(grad_scores, q, u, k, v, word_mask, probs, logit_grads, scale, needs_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(msa, CPU, m) {
  m.impl("mscmat_scores", &mscmat_scores_cpu);
  m.impl("mscmat_scores_backward", &mscmat_scores_backward_cpu);
  m.impl("mscmat_scores_for_grad", &mscmat_scores_for_grad_cpu);
  m.impl("mscmat_scores_for_grad_backward", &mscmat_scores_for_grad_backward_cpu);
}

}  // namespace msa
