// Tiles, shared-memory layouts and the global -> shared loaders of the msa::mscmat_scores CUDA kernels.
//
// Needs, included before it, either device_primitives.cuh (CUDA) or tests/cuda_emulation/cuda_emulation.h (CPU):
// half/bfloat16, MSA_DYNAMIC_SHARED and cp_async_16 / cp_async_commit / cp_async_wait.
//
// Staging. Every thread copies the same 16-byte column chunk of a fixed set of rows of each tile, so its global
// offsets are one 64-bit base per tile (its thread part computed once per kernel) plus, per 16-byte chunk, a row
// step (images) or the slot's text and word offsets (words), instead of index arithmetic per element. The copies
// are cp.async (global -> shared without registers, zero-filled for rows beyond the tensor and columns beyond
// Dh) and double-buffered: the tiles of the next step are in flight while the current step computes
// (Stager::begin_step / end_step). cp.async needs 16-byte aligned addresses on both sides, so it is used when
// Dh * sizeof(T) is a multiple of 16 bytes and q, u, k, v start 16-byte aligned (all other strides are then
// multiples of 16 bytes, the launcher passes contiguous tensors); otherwise each chunk is copied element by
// element through registers (synchronous, same layout), see choose_copy_mode.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace msa {
namespace {

constexpr int kThreads = 128;  // 4 warps; on tensor cores each warp owns 16 rows of a 64-row tile
constexpr int kMinSlotsPerText = 16;
constexpr int kMaxImageTilesPerBlock = 4;  // forward: image tiles that share one block's staged k and v
// The largest dynamic shared memory a block may opt into on sm_80 (163 KB); sm_90 allows 227 KB.
constexpr size_t kSharedMemoryBudget = 166912;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// max that returns NaN when either argument is NaN (fmaxf drops it): a NaN logit must reach the score.
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

struct Shape {
  int64_t num_images, num_texts, num_words, heads, head_dim;
  int64_t q_stride_i, q_stride_h;              // q, u (and dq, du): [Ni, H, Dh], unit last stride
  int64_t k_stride_t, k_stride_l, k_stride_h;  // k, v (and dk, dv): [Nt, L, H, Dh], unit last stride
  int slots_per_text;                          // LP, a power of two
  int slots_shift;                             // log2(LP)
  int texts_per_tile;                          // BT = BN / LP
  int image_tiles_per_block;                   // forward: 1 .. kMaxImageTilesPerBlock
  bool async_copy;                             // 16-byte cp.async staging (else element-wise)
  float scale;
};

// Tile sizes of one block, shared by host (launch sizes) and device.
// Row pads keep rows 16-byte aligned (cp.async, ldmatrix) and move
// consecutive rows 4 banks apart.
template <typename T, int DP>
struct Tiles {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int BI = kTensorCores ? 64 : 32;  // images per tile
  static constexpr int BN = kTensorCores ? 64 : 32;  // word slots per tile
  static constexpr int kMaxTexts = BN / kMinSlotsPerText;
  static constexpr int kPairs = BI * kMaxTexts;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int LDX = DP + kVec;                          // rows of Q, U, K, V
  static constexpr int LDS = BN + 4;                             // rows of S, R (float)
  static constexpr int LDG = BN + (kTensorCores ? 8 : 1);               // rows of dS, dR
  // Chunk ownership: thread t copies column chunk t % kChunksPerRow of rows t / kChunksPerRow + c * kRowsPerPass.
  static constexpr int kChunksPerRow = DP / kVec;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kImageChunks = BI / kRowsPerPass;  // per thread and tile
  static constexpr int kWordChunks = BN / kRowsPerPass;
  static_assert(DP % kVec == 0 && kThreads % kChunksPerRow == 0, "a row is whole 16-byte chunks");
  static_assert(BI % kRowsPerPass == 0 && BN % kRowsPerPass == 0, "every thread copies whole rows");
};

// Shared-memory layout of one kernel: IMAGE_STAGES buffers of Q, U and WORD_STAGES of K, V (+ their word mask),
// S and R (float32 only: tensor cores keep them in registers), per-pair statistics for GROUPS image tiles, and
// with GRADS the dS, dR tiles (and, without tensor cores, float32 gradient accumulators).
// Offsets in bytes; every region starts on a 128-byte boundary.
template <typename T, int DP, int IMAGE_STAGES, int WORD_STAGES, int GROUPS, bool GRADS>
struct Layout {
  using C = Tiles<T, DP>;
  static constexpr int kImageStages = IMAGE_STAGES;
  static constexpr int kWordStages = WORD_STAGES;
  static constexpr int kGroups = GROUPS;
  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t kImageTile = align(sizeof(T) * C::BI * C::LDX);
  static constexpr size_t kWordTile = align(sizeof(T) * C::BN * C::LDX);
  static constexpr size_t kQ = 0;
  static constexpr size_t kU = kQ + IMAGE_STAGES * kImageTile;
  static constexpr size_t kK = kU + IMAGE_STAGES * kImageTile;
  static constexpr size_t kV = kK + WORD_STAGES * kWordTile;
  static constexpr size_t kKeep = kV + WORD_STAGES * kWordTile;
  static constexpr size_t kScoreTile = C::kTensorCores ? 0 : align(sizeof(float) * C::BI * C::LDS);
  static constexpr size_t kS = align(kKeep + sizeof(float) * WORD_STAGES * C::BN);
  static constexpr size_t kR = kS + kScoreTile;
  static constexpr size_t kStats = kR + kScoreTile;  // 4 arrays per group
  static constexpr size_t kDS = kStats + align(sizeof(float) * 4 * GROUPS * C::kPairs);
  static constexpr size_t kGradTile = GRADS ? align(sizeof(T) * C::BI * C::LDG) : 0;
  static constexpr size_t kDR = kDS + kGradTile;
  static constexpr size_t kAcc = kDR + kGradTile;
  static constexpr size_t kBytes =
      kAcc + (GRADS && !C::kTensorCores ? sizeof(float) * 2 * (C::BI > C::BN ? C::BI : C::BN) * DP : 0);
  static_assert(kBytes <= kSharedMemoryBudget, "tiles exceed the shared memory of sm_80");
};

// Forward: image tiles streamed (double-buffered), the text tile's k, v staged once per head and word chunk for
// up to kMaxImageTilesPerBlock image tiles. Backward, images kernel: q, u staged once, k, v streamed. Backward,
// words kernel: k, v staged once (once per chunk for long texts), q, u streamed.
template <typename T, int DP>
using ForwardLayout = Layout<T, DP, 2, 1, kMaxImageTilesPerBlock, false>;
template <typename T, int DP>
using ImagesGradLayout = Layout<T, DP, 1, 2, 1, true>;
template <typename T, int DP>
using WordsGradLayout = Layout<T, DP, 2, 1, 1, true>;

// Pointers into one block's shared memory laid out as L.
template <typename T, typename L>
struct Smem {
  using C = typename L::C;
  unsigned char* base;
  __device__ T* q(int stage) const { return reinterpret_cast<T*>(base + L::kQ + stage * L::kImageTile); }
  __device__ T* u(int stage) const { return reinterpret_cast<T*>(base + L::kU + stage * L::kImageTile); }
  __device__ T* k(int stage) const { return reinterpret_cast<T*>(base + L::kK + stage * L::kWordTile); }
  __device__ T* v(int stage) const { return reinterpret_cast<T*>(base + L::kV + stage * L::kWordTile); }
  __device__ float* keep(int stage) const { return reinterpret_cast<float*>(base + L::kKeep) + stage * C::BN; }
  __device__ float* s() const { return reinterpret_cast<float*>(base + L::kS); }
  __device__ float* r() const { return reinterpret_cast<float*>(base + L::kR); }
  // Statistic `which` (0..3) of image tile `group`, one float per (image, text) pair.
  __device__ float* stat(int group, int which) const {
    return reinterpret_cast<float*>(base + L::kStats) + (group * 4 + which) * C::kPairs;
  }
  __device__ T* ds() const { return reinterpret_cast<T*>(base + L::kDS); }
  __device__ T* dr() const { return reinterpret_cast<T*>(base + L::kDR); }
  __device__ float* facc() const { return reinterpret_cast<float*>(base + L::kAcc); }
};

// The per-pair statistics of one image tile: running max and denominator of the softmax, the numerator
// sum_l e_l r_l (o after finalize_stats), and acc (forward: the score summed over heads; backward: grad_scores).
struct PairStats {
  float *m, *den, *num, *acc;
};

// The tiles one step of a kernel reads: rows [first_image, + BI) of head h of q and u; the word slots of texts
// [first_text, + BT), words [w0, w0 + LP) of head h of k and v.
struct StepTiles {
  int64_t first_image, first_text, w0, h;
  __device__ bool same_images(const StepTiles& o) const { return first_image == o.first_image && h == o.h; }
  __device__ bool same_words(const StepTiles& o) const { return first_text == o.first_text && w0 == o.w0 && h == o.h; }
};

// One 16-byte chunk global -> shared, the first `valid` elements from src and zeros after them. src is only
// read when valid > 0; `anywhere` is a readable address for the zero-byte copy.
template <bool kAsync, typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src, int valid, const T* anywhere) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if constexpr (kAsync) {
    // valid is kVec or 0 here (Dh is a multiple of kVec).
    cp_async_16(dst, valid > 0 ? src : anywhere, valid > 0 ? 16 : 0);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dst[e] = e < valid ? src[e] : from_float<T>(0.f);
  }
}

// Stages the tiles of a sequence of steps (see StepTiles) through L's buffers:
//   stager.start(tiles of step 0);
//   for each step: begin_step(cur, next, has_next); compute from image_stage / word_stage; end_step(...);
// A double-buffered operand of the next step is copied during the current step; a single-buffered one is
// copied after the step (its latency is exposed, which is why the single-buffered operand of each kernel is the
// one that changes least often).
template <typename T, int DP, typename L>
class Stager {
 public:
  using C = Tiles<T, DP>;
  int image_stage = 0, word_stage = 0;

  __device__ Stager(const Smem<T, L>& sm, const T* q, const T* u, const T* k, const T* v, const uint8_t* mask,
                    const Shape& p)
      : sm_(sm), q_(q), u_(u), k_(k), v_(v), mask_(mask), p_(p) {
    const int row = threadIdx.x / C::kChunksPerRow;
    col_ = (threadIdx.x % C::kChunksPerRow) * C::kVec;
    first_row_ = row;
    valid_cols_ = static_cast<int>(p.head_dim - col_ < C::kVec ? (p.head_dim > col_ ? p.head_dim - col_ : 0) : C::kVec);
    image_offset_ = row * p.q_stride_i + col_;
    image_row_step_ = C::kRowsPerPass * p.q_stride_i;
  }

  __device__ void start(const StepTiles& first) {
    load_images(0, first);
    load_words(0, first);
    cp_async_commit();
  }

  // Issues the next step's double-buffered copies, then waits for the current step's tiles.
  // (next is passed by value with a flag, not as a pointer: a pointer would keep it in local memory.)
  __device__ void begin_step(const StepTiles& cur, const StepTiles& next, bool has_next) {
    if (has_next) {
      if (L::kImageStages == 2 && !next.same_images(cur)) load_images(image_stage ^ 1, next);
      if (L::kWordStages == 2 && !next.same_words(cur)) load_words(word_stage ^ 1, next);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the group just committed
    __syncthreads();
  }

  // After the step's last read of its tiles: switch buffers, or refill the single buffer for the next step.
  __device__ void end_step(const StepTiles& cur, const StepTiles& next, bool has_next) {
    __syncthreads();
    if (has_next) {
      if (!next.same_images(cur)) {
        if (L::kImageStages == 2) {
          image_stage ^= 1;
        } else {
          load_images(0, next);
        }
      }
      if (!next.same_words(cur)) {
        if (L::kWordStages == 2) {
          word_stage ^= 1;
        } else {
          load_words(0, next);
        }
      }
    }
    cp_async_commit();
  }

 private:
  // The copy mode is decided once per tile, outside the chunk loops, so that each loop holds one kind of copy.
  __device__ void load_images(int stage, const StepTiles& t) {
    if (p_.async_copy) {
      load_images<true>(stage, t);
    } else {
      load_images<false>(stage, t);
    }
  }

  __device__ void load_words(int stage, const StepTiles& t) {
    if (p_.async_copy) {
      load_words<true>(stage, t);
    } else {
      load_words<false>(stage, t);
    }
  }

  // Rows [first_image, + BI) of head h of q and u; zeros beyond Ni and Dh.
  template <bool kAsync>
  __device__ void load_images(int stage, const StepTiles& t) {
    const int64_t base = t.first_image * p_.q_stride_i + t.h * p_.q_stride_h + image_offset_;
    T* q_dst = sm_.q(stage) + first_row_ * C::LDX + col_;
    T* u_dst = sm_.u(stage) + first_row_ * C::LDX + col_;
    // Not unrolled: the copies do not wait for each other anyway, and unrolled address arithmetic for all
    // chunks at once spills in the backward kernels, which hold their gradient accumulators throughout.
#pragma unroll 1
    for (int c = 0; c < C::kImageChunks; ++c) {
      const bool row_ok = t.first_image + first_row_ + c * C::kRowsPerPass < p_.num_images;
      const int64_t offset = base + c * image_row_step_;
      const int valid = row_ok ? valid_cols_ : 0;
      copy_chunk<kAsync>(q_dst + c * C::kRowsPerPass * C::LDX, q_ + offset, valid, q_);
      copy_chunk<kAsync>(u_dst + c * C::kRowsPerPass * C::LDX, u_ + offset, valid, u_);
    }
  }

  // The word slots of texts [first_text, + BT), words [w0, w0 + LP) of head h of k and v, and keep = 1 for a
  // real, unmasked word, 0 for a masked or padding slot (whose k, v are zeros).
  template <bool kAsync>
  __device__ void load_words(int stage, const StepTiles& t) {
    // The word mask first, its loads unrolled (one global round trip): a masked word is never read but
    // zero-filled, so whatever it holds (NaN, inf) reaches no score and no gradient (dq = dS k and du = dR v
    // would multiply its zero weight by it).
    bool unmasked[C::kWordChunks];
#pragma unroll
    for (int c = 0; c < C::kWordChunks; ++c) {
      const int slot = first_row_ + c * C::kRowsPerPass;
      const int text = slot >> p_.slots_shift, word = slot & (p_.slots_per_text - 1);
      unmasked[c] =
          real_word(t, slot) && (mask_ == nullptr || mask_[(t.first_text + text) * p_.num_words + t.w0 + word] != 0);
    }
    const int64_t base = t.first_text * p_.k_stride_t + t.w0 * p_.k_stride_l + t.h * p_.k_stride_h + col_;
    T* k_dst = sm_.k(stage) + col_;
    T* v_dst = sm_.v(stage) + col_;
#pragma unroll
    for (int c = 0; c < C::kWordChunks; ++c) {
      const int slot = first_row_ + c * C::kRowsPerPass;
      const int text = slot >> p_.slots_shift, word = slot & (p_.slots_per_text - 1);
      const int64_t offset = base + text * p_.k_stride_t + word * p_.k_stride_l;
      const int valid = unmasked[c] ? valid_cols_ : 0;
      copy_chunk<kAsync>(k_dst + slot * C::LDX, k_ + offset, valid, k_);
      copy_chunk<kAsync>(v_dst + slot * C::LDX, v_ + offset, valid, v_);
    }
    if (col_ == 0) {
      float* keep = sm_.keep(stage);
#pragma unroll
      for (int c = 0; c < C::kWordChunks; ++c) keep[first_row_ + c * C::kRowsPerPass] = unmasked[c] ? 1.f : 0.f;
    }
  }

  // Slot `slot` of the tile holds a word of a text (not padding, not beyond Nt or L).
  __device__ bool real_word(const StepTiles& t, int slot) const {
    const int text = slot >> p_.slots_shift, word = slot & (p_.slots_per_text - 1);
    return text < p_.texts_per_tile && t.first_text + text < p_.num_texts && t.w0 + word < p_.num_words;
  }

  // Copies, not references: a reference to a kernel parameter would force it into local memory.
  Smem<T, L> sm_;
  const T *q_, *u_, *k_, *v_;
  const uint8_t* mask_;
  Shape p_;
  int col_, first_row_, valid_cols_;
  int64_t image_offset_, image_row_step_;
};

// Slots per text (a power of two >= 16, at most BN) and texts per tile for this word count.
template <typename T, int DP>
void set_slots(Shape& p) {
  using C = Tiles<T, DP>;
  int slots = kMinSlotsPerText, shift = 4;
  while (slots < p.num_words && slots < C::BN) {
    slots *= 2;
    ++shift;
  }
  p.slots_per_text = slots;
  p.slots_shift = shift;
  p.texts_per_tile = C::BN / slots;
}

// cp.async when every chunk's global address is 16-byte aligned: Dh * sizeof(T) a multiple of 16 bytes (then so
// are the strides of contiguous tensors, which are multiples of Dh) and every tensor starting 16-byte aligned.
template <typename T>
void choose_copy_mode(Shape& p, const void* q, const void* u, const void* k, const void* v) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  const bool strides_ok = p.head_dim % kVec == 0 && p.q_stride_i % kVec == 0 && p.q_stride_h % kVec == 0 &&
                          p.k_stride_t % kVec == 0 && p.k_stride_l % kVec == 0 && p.k_stride_h % kVec == 0;
  p.async_copy = strides_ok && aligned(q) && aligned(u) && aligned(k) && aligned(v);
}

}  // namespace
}  // namespace msa
