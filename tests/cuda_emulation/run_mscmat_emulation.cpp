// Runs csrc/cuda/mscmat_cuda.cu's forward and backward kernels on the CPU (cuda_emulation.h) for float,
// half and bfloat16 and every padded head dim, and compares scores and all four gradients with a float64
// reference computed here from the same rounded inputs. Prints one line per case; exit status 1 on a mismatch.
//
//   g++ -std=c++20 -O2 -pthread -I tests/cuda_emulation tests/cuda_emulation/run_mscmat_emulation.cpp

#define MSA_CUDA_EMULATION 1
#include "../../csrc/cuda/mscmat_cuda.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

namespace {

using msa::Shape;

struct Case {
  const char* dtype;
  int64_t ni, nt, length, heads, head_dim;
  const char* mask;  // "none", "random", "masked-texts", "all"
};

template <typename T>
T from_f(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

template <typename T>
double to_d(T x) {
  return static_cast<double>(nvcuda::wmma::as_float(x));
}

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
        double max_logit = -INFINITY;
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
          max_logit = std::max(max_logit, s[l]);
        }
        if (max_logit == -INFINITY) continue;
        double den = 0, o = 0;
        for (int64_t l = 0; l < L; ++l) den += (p[l] = std::exp(s[l] - max_logit));
        for (int64_t l = 0; l < L; ++l) o += (p[l] /= den) * r[l];
        out.scores[i * c.nt + j] += o;
        const double gij = g[i * c.nt + j];
        for (int64_t l = 0; l < L; ++l) {
          const double ds = gij * p[l] * (r[l] - o) * scale, dr = gij * p[l];
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

template <typename T>
double max_relative_error(const std::vector<T>& got, const std::vector<double>& want) {
  double error = 0, magnitude = 1.0;
  for (size_t n = 0; n < want.size(); ++n) {
    error = std::max(error, std::abs(to_d(got[n]) - want[n]));
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
      rounded[e] = from_f<T>(normal(rng));
      exact[e] = to_d(rounded[e]);  // the reference sees the same rounded inputs
    }
  };
  std::vector<T> q, u, k, v;
  std::vector<double> qd, ud, kd, vd;
  random_tensor(c.ni * c.heads * c.head_dim, q, qd);
  random_tensor(c.ni * c.heads * c.head_dim, u, ud);
  random_tensor(c.nt * c.length * c.heads * c.head_dim, k, kd);
  random_tensor(c.nt * c.length * c.heads * c.head_dim, v, vd);
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
  std::vector<double> g(c.ni * c.nt);
  std::vector<float> g32(c.ni * c.nt);
  for (size_t n = 0; n < g.size(); ++n) g[n] = g32[n] = normal(rng);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));

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
  msa::set_slots<T, DP>(p);
  const uint8_t* mask_ptr = has_mask ? mask.data() : nullptr;

  std::vector<T> scores(c.ni * c.nt, from_f<T>(0.f));
  const int64_t image_tiles = (c.ni + C::BI - 1) / C::BI;
  const int64_t text_tiles = (c.nt + p.texts_per_tile - 1) / p.texts_per_tile;
  cuda_emulation::launch(msa::mscmat_scores_fwd_kernel<T, DP>, dim3(image_tiles * text_tiles), msa::kThreads,
                         C::kBytes, q.data(), u.data(), k.data(), v.data(), mask_ptr, scores.data(), p);

  std::vector<T> dq(q.size(), from_f<T>(0.f)), du(u.size(), from_f<T>(0.f)), dk(k.size(), from_f<T>(0.f)),
      dv(v.size(), from_f<T>(0.f));
  cuda_emulation::launch(msa::mscmat_scores_bwd_images_kernel<T, DP>, dim3(image_tiles, c.heads), msa::kThreads,
                         C::kBytes, q.data(), u.data(), k.data(), v.data(), mask_ptr, g32.data(), dq.data(),
                         du.data(), p);
  const int64_t chunks = (c.length + p.slots_per_text - 1) / p.slots_per_text;
  cuda_emulation::launch(msa::mscmat_scores_bwd_words_kernel<T, DP>, dim3(text_tiles * chunks, c.heads),
                         msa::kThreads, C::kBytes, q.data(), u.data(), k.data(), v.data(), mask_ptr, g32.data(),
                         dk.data(), dv.data(), p);

  const Reference want = reference(qd, ud, kd, vd, mask, has_mask, g, c, scale);
  const double errors[5] = {max_relative_error(scores, want.scores), max_relative_error(dq, want.dq),
                            max_relative_error(du, want.du), max_relative_error(dk, want.dk),
                            max_relative_error(dv, want.dv)};
  // Errors relative to the largest magnitude: float32 accumulation of rounded products, and for half and
  // bfloat16 the rounding of dS and dR before their products plus the output's own rounding.
  const double tolerance = std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, __half> ? 2e-3 : 1.6e-2);
  bool ok = true;
  for (double e : errors) ok = ok && e <= tolerance;
  if (mask_kind == "all") {
    for (const T& s : scores) ok = ok && to_d(s) == 0.0;
  }
  if (mask_kind == "masked-texts") {
    for (int64_t i = 0; i < c.ni; ++i) {
      for (int64_t j = 1; j < c.nt; j += 3) ok = ok && to_d(scores[i * c.nt + j]) == 0.0;
    }
  }
  std::printf("%s %-5s Ni=%lld Nt=%lld L=%lld H=%lld Dh=%lld DP=%d LP=%d BT=%d mask=%s | rel err scores %.2e "
              "dq %.2e du %.2e dk %.2e dv %.2e (tol %.0e)\n",
              ok ? "ok  " : "FAIL", c.dtype, static_cast<long long>(c.ni), static_cast<long long>(c.nt),
              static_cast<long long>(c.length), static_cast<long long>(c.heads), static_cast<long long>(c.head_dim),
              DP, p.slots_per_text, p.texts_per_tile, c.mask, errors[0], errors[1], errors[2], errors[3], errors[4],
              tolerance);
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
  // chunks. The cases cut both tiles, chunk the texts (float L > 32, half L > 64), pad Dh, and mask.
  const Case cases[] = {
      {"f32", 37, 7, 12, 2, 32, "random"},         {"f32", 33, 5, 40, 1, 64, "masked-texts"},
      {"f32", 5, 3, 3, 2, 128, "none"},            {"f32", 4, 4, 5, 1, 24, "all"},
      {"f16", 70, 9, 19, 2, 32, "masked-texts"},   {"f16", 65, 3, 77, 1, 64, "random"},
      {"f16", 20, 5, 30, 1, 128, "none"},          {"bf16", 70, 9, 7, 2, 48, "random"},
      {"bf16", 9, 4, 70, 1, 32, "masked-texts"},   {"bf16", 16, 3, 16, 1, 128, "all"},
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
