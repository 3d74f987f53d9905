// Host side of the msa::mscmat_scores CUDA kernels: argument checks, launch sizes, dtype and head-dim dispatch,
// registration under the CUDA dispatch key. The kernels are in mscmat_kernels.cuh (see its header for the
// tiling), their tensor-core steps in mscmat_warp.cuh, the tiles and loaders in mscmat_tiles.cuh;
// tests/cuda_emulation runs all three on the CPU.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>

// In this order: the primitives, the tiles and loaders, the warp-level steps, the kernels.
#include "device_primitives.cuh"
// clang-format off
#include "mscmat_tiles.cuh"
#include "mscmat_warp.cuh"
#include "mscmat_kernels.cuh"
// clang-format on

namespace msa {
namespace {

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

// Raises the kernel's dynamic shared-memory limit to `bytes`, after checking that the device allows that much.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, int device, const char* name) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), name, ": the kernel's tiles need ", bytes,
              " bytes of shared memory, this device allows ", limit, " per block; use backend='triton'");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Image tiles per forward block: as many (up to kMaxImageTilesPerBlock) as keep two full waves of blocks, so
// each staged text tile serves several image tiles without leaving multiprocessors idle.
template <typename Kernel>
int image_tiles_per_block(Kernel kernel, size_t bytes, int device, int64_t image_tiles, int64_t text_tiles) {
  int multiprocessors = 0, blocks_per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, kThreads, bytes));
  const int64_t two_waves = 2 * static_cast<int64_t>(multiprocessors) * std::max(blocks_per_multiprocessor, 1);
  int per_block = 1;
  while (2 * per_block <= kMaxImageTilesPerBlock && per_block < image_tiles &&
         (image_tiles + 2 * per_block - 1) / (2 * per_block) * text_tiles >= two_waves) {
    per_block *= 2;
  }
  return per_block;
}

template <typename T, int DP>
void forward_launch(const Prepared& in, at::Tensor& out) {
  using C = Tiles<T, DP>;
  constexpr size_t kBytes = ForwardLayout<T, DP>::kBytes;
  const char* name = "msa::mscmat_scores";
  Shape p = in.shape;
  set_slots<T, DP>(p);
  choose_copy_mode<T>(p, in.q.data_ptr(), in.u.data_ptr(), in.k.data_ptr(), in.v.data_ptr());
  const int device = in.q.get_device();
  const int64_t image_tiles = (p.num_images + C::BI - 1) / C::BI;
  const int64_t text_tiles = (p.num_texts + p.texts_per_tile - 1) / p.texts_per_tile;
  auto kernel = mscmat_scores_fwd_kernel<T, DP>;
  allow_shared_memory(kernel, kBytes, device, name);
  p.image_tiles_per_block = image_tiles_per_block(kernel, kBytes, device, image_tiles, text_tiles);
  const int64_t blocks = (image_tiles + p.image_tiles_per_block - 1) / p.image_tiles_per_block * text_tiles;
  TORCH_CHECK(blocks < (int64_t{1} << 31), name, ": too many tiles for one launch");
  kernel<<<static_cast<unsigned>(blocks), kThreads, kBytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(in.q.data_ptr()), reinterpret_cast<const T*>(in.u.data_ptr()),
      reinterpret_cast<const T*>(in.k.data_ptr()), reinterpret_cast<const T*>(in.v.data_ptr()),
      in.mask.defined() ? in.mask.data_ptr<uint8_t>() : nullptr, reinterpret_cast<T*>(out.data_ptr()), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The images kernel writes dq and du, the words kernel dk and dv: each runs only when one of its pair is
// asked for (the other of the pair then lands in a scratch tensor).
template <typename T, int DP>
void backward_launch(const Prepared& in, const at::Tensor& grad, at::Tensor& dq, at::Tensor& du, at::Tensor& dk,
                     at::Tensor& dv, bool images_grads, bool words_grads) {
  using C = Tiles<T, DP>;
  const char* name = "msa::mscmat_scores_backward";
  Shape p = in.shape;
  set_slots<T, DP>(p);
  choose_copy_mode<T>(p, in.q.data_ptr(), in.u.data_ptr(), in.k.data_ptr(), in.v.data_ptr());
  p.image_tiles_per_block = 1;
  const int device = in.q.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const T* q = reinterpret_cast<const T*>(in.q.data_ptr());
  const T* u = reinterpret_cast<const T*>(in.u.data_ptr());
  const T* k = reinterpret_cast<const T*>(in.k.data_ptr());
  const T* v = reinterpret_cast<const T*>(in.v.data_ptr());
  const uint8_t* mask = in.mask.defined() ? in.mask.data_ptr<uint8_t>() : nullptr;
  const float* g = grad.data_ptr<float>();
  TORCH_CHECK(p.heads < 65536, name, ": at most 65535 heads");

  const int64_t image_tiles = (p.num_images + C::BI - 1) / C::BI;
  TORCH_CHECK(image_tiles < (int64_t{1} << 31), name, ": too many image tiles");
  if (images_grads) {
    auto images_kernel = mscmat_scores_bwd_images_kernel<T, DP>;
    constexpr size_t kImagesBytes = ImagesGradLayout<T, DP>::kBytes;
    allow_shared_memory(images_kernel, kImagesBytes, device, name);
    images_kernel<<<dim3(static_cast<unsigned>(image_tiles), static_cast<unsigned>(p.heads)), kThreads, kImagesBytes,
                    stream>>>(q, u, k, v, mask, g, reinterpret_cast<T*>(dq.data_ptr()),
                              reinterpret_cast<T*>(du.data_ptr()), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!words_grads) return;

  const int64_t chunks = (p.num_words + p.slots_per_text - 1) / p.slots_per_text;
  const int64_t text_tiles = (p.num_texts + p.texts_per_tile - 1) / p.texts_per_tile;
  TORCH_CHECK(text_tiles * chunks < (int64_t{1} << 31), name, ": too many tiles");
  auto words_kernel = mscmat_scores_bwd_words_kernel<T, DP>;
  constexpr size_t kWordsBytes = WordsGradLayout<T, DP>::kBytes;
  allow_shared_memory(words_kernel, kWordsBytes, device, name);
  words_kernel<<<dim3(static_cast<unsigned>(text_tiles * chunks), static_cast<unsigned>(p.heads)), kThreads,
                 kWordsBytes, stream>>>(q, u, k, v, mask, g, reinterpret_cast<T*>(dk.data_ptr()),
                                        reinterpret_cast<T*>(dv.data_ptr()), p);
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
    const at::Tensor& grad_scores, const at::Tensor& q, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& word_mask, double scale, std::array<bool, 4> needs_grad) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared in = prepare(q, u, k, v, word_mask, scale, "msa::mscmat_scores_backward");
  TORCH_CHECK(
      grad_scores.dim() == 2 && grad_scores.size(0) == in.shape.num_images && grad_scores.size(1) == in.shape.num_texts,
      "msa::mscmat_scores_backward: grad_scores must be [Ni, Nt]");
  const at::Tensor grad = grad_scores.to(at::kFloat).contiguous();
  const bool images_grads = needs_grad[0] || needs_grad[1], words_grads = needs_grad[2] || needs_grad[3];
  const auto make = [](bool pair_needed, const at::Tensor& like) {
    return pair_needed ? at::zeros_like(like) : at::empty({0}, like.options());
  };
  at::Tensor dq = make(images_grads, in.q), du = make(images_grads, in.u);
  at::Tensor dk = make(words_grads, in.k), dv = make(words_grads, in.v);
  const bool any_work = grad.numel() > 0 && in.shape.num_words > 0 && in.shape.heads > 0;
  if (any_work && (images_grads || words_grads)) {
    dispatch(q.scalar_type(), in.shape.head_dim, [&]<typename T, int DP>() {
      backward_launch<T, DP>(in, grad, dq, du, dk, dv, images_grads, words_grads);
    });
  }
  const auto finish = [](const at::Tensor& g, bool needed) { return needed ? g : at::empty({0}, g.options()); };
  return {finish(dq, needs_grad[0]), finish(du, needs_grad[1]), finish(dk, needs_grad[2]), finish(dv, needs_grad[3])};
}

}  // namespace

TORCH_LIBRARY_IMPL(msa, CUDA, m) {
  m.impl("mscmat_scores", &mscmat_scores_cuda);
  m.impl("mscmat_scores_backward", &mscmat_scores_backward_cuda);
}

}  // namespace msa
