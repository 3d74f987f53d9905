// Runs the forward and backward kernels of csrc/cuda (mscmat_tiles.cuh, mscmat_kernels.cuh: the same code the
// CUDA build compiles) on the CPU (cuda_emulation.h) for float, half and bfloat16, every padded head dim, both
// staging modes (cp.async and element-wise), several image tiles per forward block, masks and NaN inputs, and
// compares scores and all four gradients with a float64 reference computed here from the same rounded inputs.
// Prints one line per case; exit status 1 on a mismatch.
//
//   g++ -std=c++20 -O2 -pthread -I tests/cuda_emulation tests/cuda_emulation/run_mscmat_emulation.cpp

#include "cuda_emulation.h"
// clang-format off
#include "../../csrc/cuda/mscmat_tiles.cuh"
#include "../../csrc/cuda/mscmat_warp.cuh"
#include "../../csrc/cuda/mscmat_kernels.cuh"
// clang-format on

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

namespace {

using msa::from_float;  // the kernels' own conversions between T and float
using msa::Shape;
using msa::to_float;

struct Case {
  const char* dtype;
  int64_t ni, nt, length, heads, head_dim;
  const char* mask;          // "none", "random", "masked-texts", "all"
  int images_per_block = 1;  // forward: image tiles per block
  bool misaligned = false;   // q, u, k, v start one element past a 16-byte boundary: element-wise staging
  bool nan = false;          // one element of q is NaN: its image's scores and gradients must be NaN
  bool poison = false;       // k, v hold NaN and inf at masked words: nothing may change (the reference sees zeros)
};

struct Reference {
  std::vector<double> scores, dq, du, dk, dv;
};

// scores and gradients (for grad_scores g) in float64, straight from the definition.
Reference reference(const std::vector<double>& q, const std::vector<double>& u, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<uint8_t>& mask, bool has_mask,
                    const std::vector<double>& g, const Case& c, double scale) {
  const int64_t H = c.heads, D = c.head_dim, L = c.length;
  Reference out;
  out.scores.assign(c.ni * c.nt, 0.0);
  out.dq.assign(q.size(), 0.0);
  out.du.assign(u.size(), 0.0);
  out.dk.assign(k.size(), 0.0);
  out.dv.assign(v.size(), 0.0);
  std::vector<double> s(L), r(L), p(L);
  for (int64_t i = 0; i < c.ni; ++i) {
    for (int64_t j = 0; j < c.nt; ++j) {
      for (int64_t h = 0; h < H; ++h) {
        const double* qi = &q[(i * H + h) * D];
        const double* ui = &u[(i * H + h) * D];
        double max_logit = -INFINITY;  // NaN when a valid logit is NaN, as torch's softmax
        for (int64_t l = 0; l < L; ++l) {
          const double* kj = &k[((j * L + l) * H + h) * D];
          const double* vj = &v[((j * L + l) * H + h) * D];
          double dot_qk = 0, dot_uv = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot_qk += qi[d] * kj[d];
            dot_uv += ui[d] * vj[d];
          }
          const bool valid = !has_mask || mask[j * L + l] != 0;
          s[l] = valid ? dot_qk * scale : -INFINITY;
          r[l] = dot_uv;
          if (std::isnan(s[l]) || s[l] > max_logit) max_logit = s[l];
        }
        if (max_logit == -INFINITY) continue;
        double den = 0, o = 0;
        for (int64_t l = 0; l < L; ++l) den += (p[l] = std::exp(s[l] - max_logit));
        for (int64_t l = 0; l < L; ++l) o += (p[l] /= den) * r[l];
        out.scores[i * c.nt + j] += o;
        const double gij = g[i * c.nt + j];
        for (int64_t l = 0; l < L; ++l) {
          // A masked word is outside the softmax: weight 0 even when the pair's o is NaN (its dk, dv are then 0
          // times q, u, as in the kernels' products: NaN only where q or u is).
          const bool valid = s[l] != -INFINITY;
          const double ds = valid ? gij * p[l] * (r[l] - o) * scale : 0.0, dr = valid ? gij * p[l] : 0.0;
          const int64_t word = ((j * L + l) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            out.dq[(i * H + h) * D + d] += ds * k[word + d];
            out.dk[word + d] += ds * q[(i * H + h) * D + d];
            out.du[(i * H + h) * D + d] += dr * v[word + d];
            out.dv[word + d] += dr * u[(i * H + h) * D + d];
          }
        }
      }
    }
  }
  return out;
}

// Largest error relative to the largest magnitude; infinite where exactly one of got and want is NaN.
template <typename T>
double max_relative_error(const T* got, const std::vector<double>& want) {
  double error = 0, magnitude = 1.0;
  for (size_t n = 0; n < want.size(); ++n) {
    const double value = to_float(got[n]);
    if (std::isnan(value) != std::isnan(want[n])) return INFINITY;
    if (std::isnan(value)) continue;
    error = std::max(error, std::abs(value - want[n]));
    magnitude = std::max(magnitude, std::abs(want[n]));
  }
  return error / magnitude;
}

template <typename T, int DP>
bool run_case(const Case& c, std::mt19937& rng) {
  using C = msa::Tiles<T, DP>;
  std::normal_distribution<float> normal;
  const auto random_tensor = [&](int64_t n, std::vector<T>& rounded, std::vector<double>& exact) {
    rounded.resize(n);
    exact.resize(n);
    for (int64_t e = 0; e < n; ++e) {
      rounded[e] = from_float<T>(normal(rng));
      exact[e] = to_float(rounded[e]);  // the reference sees the same rounded inputs
    }
  };
  std::vector<T> q, u, k, v;
  std::vector<double> qd, ud, kd, vd;
  random_tensor(c.ni * c.heads * c.head_dim, q, qd);
  random_tensor(c.ni * c.heads * c.head_dim, u, ud);
  random_tensor(c.nt * c.length * c.heads * c.head_dim, k, kd);
  random_tensor(c.nt * c.length * c.heads * c.head_dim, v, vd);
  const int64_t nan_image = c.ni / 2;
  if (c.nan) {
    q[nan_image * c.heads * c.head_dim + c.head_dim - 1] = from_float<T>(NAN);
    qd[nan_image * c.heads * c.head_dim + c.head_dim - 1] = NAN;
  }
  const std::string mask_kind = c.mask;
  const bool has_mask = mask_kind != "none";
  std::vector<uint8_t> mask(c.nt * c.length, 1);
  std::bernoulli_distribution keep(0.7);
  for (int64_t j = 0; j < c.nt; ++j) {
    for (int64_t l = 0; l < c.length; ++l) {
      uint8_t value = mask_kind == "all" ? 0 : (l == 0 ? 1 : keep(rng));
      if (mask_kind == "masked-texts" && j % 3 == 1) value = 0;
      mask[j * c.length + l] = value;
    }
  }
  if (c.poison) {  // the kernels' inputs only: the reference keeps the finite values, which it never uses
    for (int64_t w = 0; w < c.nt * c.length; ++w) {
      if (mask[w] != 0) continue;
      for (int64_t e = w * c.heads * c.head_dim; e < (w + 1) * c.heads * c.head_dim; ++e) {
        k[e] = from_float<T>(NAN);
        v[e] = from_float<T>(e % 2 ? INFINITY : -INFINITY);
      }
    }
  }
  std::vector<double> g(c.ni * c.nt);
  std::vector<float> g32(c.ni * c.nt);
  for (size_t n = 0; n < g.size(); ++n) g[n] = g32[n] = normal(rng);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));

  // The kernels' view of the inputs and gradients: one element past the (16-byte aligned) start of their
  // storage when the case is misaligned.
  const size_t shift = c.misaligned ? 1 : 0;
  const auto placed = [&](const std::vector<T>& values) {
    std::vector<T> storage(values.size() + 1, from_float<T>(0.f));
    std::copy(values.begin(), values.end(), storage.begin() + shift);
    return storage;
  };
  std::vector<T> q_in = placed(q), u_in = placed(u), k_in = placed(k), v_in = placed(v);
  std::vector<T> scores(c.ni * c.nt + 1, from_float<T>(0.f)), dq_out = placed(std::vector<T>(q.size(), from_float<T>(0.f)));
  std::vector<T> du_out = dq_out, dk_out = placed(std::vector<T>(k.size(), from_float<T>(0.f))), dv_out = dk_out;

  Shape p{};
  p.num_images = c.ni;
  p.num_texts = c.nt;
  p.num_words = c.length;
  p.heads = c.heads;
  p.head_dim = c.head_dim;
  p.q_stride_i = c.heads * c.head_dim;
  p.q_stride_h = c.head_dim;
  p.k_stride_t = c.length * c.heads * c.head_dim;
  p.k_stride_l = c.heads * c.head_dim;
  p.k_stride_h = c.head_dim;
  p.scale = static_cast<float>(scale);
  p.image_tiles_per_block = c.images_per_block;
  msa::set_slots<T, DP>(p);
  const T *qp = q_in.data() + shift, *up = u_in.data() + shift, *kp = k_in.data() + shift, *vp = v_in.data() + shift;
  msa::choose_copy_mode<T>(p, qp, up, kp, vp);
  const uint8_t* mask_ptr = has_mask ? mask.data() : nullptr;

  const int64_t image_tiles = (c.ni + C::BI - 1) / C::BI;
  const int64_t image_groups = (image_tiles + c.images_per_block - 1) / c.images_per_block;
  const int64_t text_tiles = (c.nt + p.texts_per_tile - 1) / p.texts_per_tile;
  cuda_emulation::launch(msa::mscmat_scores_fwd_kernel<T, DP>, dim3(image_groups * text_tiles), msa::kThreads,
                         msa::ForwardLayout<T, DP>::kBytes, qp, up, kp, vp, mask_ptr, scores.data(), p);
  p.image_tiles_per_block = 1;
  cuda_emulation::launch(msa::mscmat_scores_bwd_images_kernel<T, DP>, dim3(image_tiles, c.heads), msa::kThreads,
                         msa::ImagesGradLayout<T, DP>::kBytes, qp, up, kp, vp, mask_ptr, g32.data(),
                         dq_out.data() + shift, du_out.data() + shift, p);
  const int64_t chunks = (c.length + p.slots_per_text - 1) / p.slots_per_text;
  cuda_emulation::launch(msa::mscmat_scores_bwd_words_kernel<T, DP>, dim3(text_tiles * chunks, c.heads), msa::kThreads,
                         msa::WordsGradLayout<T, DP>::kBytes, qp, up, kp, vp, mask_ptr, g32.data(),
                         dk_out.data() + shift, dv_out.data() + shift, p);
  // Nothing written outside the outputs: the element before (misaligned) or after them is still zero.
  bool ok = to_float(scores.back()) == 0.0 && to_float(dq_out[shift ? 0 : q.size()]) == 0.0 &&
            to_float(dk_out[shift ? 0 : k.size()]) == 0.0;

  const Reference want = reference(qd, ud, kd, vd, mask, has_mask, g, c, scale);
  const double errors[5] = {
      max_relative_error(scores.data(), want.scores), max_relative_error(dq_out.data() + shift, want.dq),
      max_relative_error(du_out.data() + shift, want.du), max_relative_error(dk_out.data() + shift, want.dk),
      max_relative_error(dv_out.data() + shift, want.dv)};
  // Errors relative to the largest magnitude: float32 accumulation of rounded products, and for half and
  // bfloat16 the rounding of dS and dR before their products plus the output's own rounding.
  const double tolerance = std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, __half> ? 2e-3 : 1.6e-2);
  for (double e : errors) ok = ok && e <= tolerance;
  if (mask_kind == "all") {
    for (const T& s : scores) ok = ok && to_float(s) == 0.0;
  }
  if (c.nan) {  // the NaN image's row is NaN (the comparison above checked where), and nothing else
    for (int64_t j = 0; j < c.nt; ++j) ok = ok && std::isnan(to_float(scores[nan_image * c.nt + j]));
    for (int64_t n = 0; n < c.ni * c.nt; ++n) ok = ok && (n / c.nt == nan_image || !std::isnan(to_float(scores[n])));
  }
  if (mask_kind == "masked-texts") {
    for (int64_t i = 0; i < c.ni; ++i) {
      for (int64_t j = 1; j < c.nt; j += 3) ok = ok && to_float(scores[i * c.nt + j]) == 0.0;
    }
  }
  std::printf(
      "%s %-5s Ni=%lld Nt=%lld L=%lld H=%lld Dh=%lld DP=%d LP=%d BT=%d G=%d copy=%s mask=%s%s | rel err "
      "scores %.2e dq %.2e du %.2e dk %.2e dv %.2e (tol %.0e)\n",
      ok ? "ok  " : "FAIL", c.dtype, static_cast<long long>(c.ni), static_cast<long long>(c.nt),
      static_cast<long long>(c.length), static_cast<long long>(c.heads), static_cast<long long>(c.head_dim), DP,
      p.slots_per_text, p.texts_per_tile, c.images_per_block, p.async_copy ? "async" : "elements", c.mask,
      c.nan ? " nan" : "", errors[0], errors[1], errors[2], errors[3], errors[4], tolerance);
  return ok;
}

template <typename T>
bool run_for_head_dim(const Case& c, std::mt19937& rng) {
  if (c.head_dim <= 32) return run_case<T, 32>(c, rng);
  if (c.head_dim <= 64) return run_case<T, 64>(c, rng);
  return run_case<T, 128>(c, rng);
}

}  // namespace

int main() {
  // Tiles: 64 images x 64 word slots (half, bfloat16), 32 x 32 (float); slots per text 16..BN, longer texts in
  // chunks. The cases cut both tiles, chunk the texts (float L > 32, half L > 64), pad Dh, mask, give forward
  // blocks several image tiles (the last group short), stage element-wise (misaligned starts, Dh not a
  // multiple of 16 bytes) and feed NaN.
  // {dtype, Ni, Nt, L, H, Dh, mask, image tiles per forward block, misaligned, nan, poison}
  const Case cases[] = {
      {"f32", 37, 7, 12, 2, 32, "random"},
      {"f32", 33, 5, 40, 1, 64, "masked-texts", 2},
      {"f32", 5, 3, 3, 2, 128, "none"},
      {"f32", 4, 4, 5, 1, 24, "all"},
      {"f32", 70, 4, 40, 2, 30, "random", 4},
      {"f32", 20, 4, 40, 1, 32, "none", 2, false, true},
      {"f16", 70, 9, 19, 2, 32, "masked-texts"},
      {"f16", 65, 3, 77, 1, 64, "random"},
      {"f16", 20, 5, 30, 1, 128, "none"},
      {"f16", 150, 5, 19, 1, 64, "masked-texts", 2},
      {"f16", 140, 3, 77, 1, 64, "random", 4},
      {"f16", 30, 4, 12, 2, 64, "random", 1, true},
      {"bf16", 70, 9, 7, 2, 48, "random"},
      {"bf16", 9, 4, 70, 1, 32, "masked-texts"},
      {"bf16", 16, 3, 16, 1, 128, "all"},
      {"bf16", 200, 9, 32, 2, 64, "random", 4},
      {"bf16", 40, 5, 10, 2, 20, "masked-texts", 2},
      {"bf16", 40, 5, 10, 2, 64, "none", 1, false, true},
      {"f16", 30, 5, 70, 1, 64, "random", 2, false, true},
      {"f16", 30, 5, 70, 1, 64, "none", 2, false, true},
      {"f16", 30, 5, 10, 1, 64, "random", 2, false, true},
      {"bf16", 70, 3, 70, 1, 128, "random", 2, true},
      {"f32", 21, 6, 40, 2, 32, "masked-texts", 2, false, false, true},
      {"f16", 70, 5, 19, 2, 64, "random", 1, true, false, true},
      {"bf16", 40, 4, 70, 1, 64, "masked-texts", 2, false, false, true},
  };
  std::mt19937 rng(0);
  bool all_ok = true;
  for (const Case& c : cases) {
    const std::string dtype = c.dtype;
    bool ok;
    if (dtype == "f32") {
      ok = run_for_head_dim<float>(c, rng);
    } else if (dtype == "f16") {
      ok = run_for_head_dim<__half>(c, rng);
    } else {
      ok = run_for_head_dim<__nv_bfloat16>(c, rng);
    }
    all_ok = all_ok && ok;
  }
  std::printf("%s\n", all_ok ? "all cases match" : "MISMATCH");
  return all_ok ? 0 : 1;
}
