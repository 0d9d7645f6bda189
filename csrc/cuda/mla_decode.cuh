// What the host side of the attention op (mla_attention.cu) and the decode
// kernel instantiations (instantiations/*.cu) share: the kernels' parameter
// structs, the tensor-core configurations, the two functions (prepare,
// launch) every instantiation defines and the helpers behind them. No ATen
// here, so an instantiation file compiles its kernels without parsing the
// torch headers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "../raw_slice.h"

namespace mla_cuda {

// Dynamic shared memory a kernel may use without opting in to more
// (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Device pointers of one call, the same for every decode kernel; the
// launchers cast the untyped ones to the kernel's T. part_out and part_lse
// hold the per-split results and are null when there is one split.
struct DecodeBuffers {
  const void* q_latent;
  const void* q_rope;
  const void* cache;
  const int* block_table;
  const int* seq_lens;
  void* out;
  float* lse;
  float* part_out;
  float* part_lse;
};

// Both decode kernels take these parameters: the buffers as T, then Shape.
template <typename T, typename Shape>
using DecodeKernel = void (*)(const T*, const T*, const T*, const int*, const int*, T*, float*,
                              float*, float*, Shape);

// Opts `kernel` (any kernel function) in to `smem` bytes of dynamic shared
// memory (when over kDefaultDynamicSmem) and returns how many of its blocks
// of `threads` threads fit on one SM.
template <typename Kernel>
int prepare_kernel(Kernel kernel, int threads, size_t smem) {
  if (smem > kDefaultDynamicSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return per_sm;
}

template <typename T, typename Shape>
int prepare_decode_kernel(DecodeKernel<T, Shape> kernel, int threads, size_t smem) {
  return prepare_kernel(kernel, threads, smem);
}

template <typename T, typename Shape>
void launch_decode_kernel(DecodeKernel<T, Shape> kernel, dim3 grid, int threads, size_t smem,
                          cudaStream_t stream, const DecodeBuffers& buf, const Shape& s) {
  kernel<<<grid, threads, smem, stream>>>(
      static_cast<const T*>(buf.q_latent), static_cast<const T*>(buf.q_rope),
      static_cast<const T*>(buf.cache), buf.block_table, buf.seq_lens,
      static_cast<T*>(buf.out), buf.lse, buf.part_out, buf.part_lse, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The FMA kernel (mla_decode_fma.cuh): every dtype, every row width.
namespace fma_decode {

constexpr int kThreads = 256;

struct Shape {
  int B, Q, n_h, R, rope2, n_kv, D;
  int block_size, max_blocks, num_blocks;
  int M;            // query rows per sequence: Q * n_h
  int rows;         // query rows per block (<= kRows of the instantiation)
  int head_chunks;  // ceil(M / rows)
  int out_cols;     // output columns per block
  int row_stride;   // shared-memory row stride of the staged tile (elements)
  int q_stride;     // shared-memory row stride of q_aug (floats)
  int tile;         // tokens per tile (TT)
  int lanes;        // threads per token in the score phase (TT * lanes = 256)
  int num_splits;
  bool use_red;     // token groups share output columns: merge through smem
  float scale_log2;
};

// Opts the kernel in to `smem` bytes of dynamic shared memory (when over
// kDefaultDynamicSmem) and returns how many of its blocks fit on one SM.
template <typename T, int kRows, bool kVectorized>
int prepare(size_t smem);

// Launches the kernel on `grid` with kThreads threads and `smem` bytes.
template <typename T, int kRows, bool kVectorized>
void launch(const DecodeBuffers& buf, const Shape& p, dim3 grid, size_t smem, cudaStream_t stream);

}  // namespace fma_decode

// The tensor-core kernel (mla_decode_mma.cuh): 16-bit caches, sm_80+.
namespace mma_decode {

struct Shape {
  int B, Q, n_h, R, rope2, n_kv, D;
  int block_size, max_blocks, num_blocks;
  int M;           // query rows per sequence: Q * n_h
  int k_steps;     // 16-wide steps of D (D padded to 16)
  int kq;          // k steps per warp (<= the instantiation's KQ)
  int kn;          // 8-wide output column tiles per warp (even, <= KN)
  int row_stride;  // shared-memory row stride (elements): 16-byte skew, so
                   // the 8 row addresses of an ldmatrix hit distinct banks
  int num_splits;
  float scale_log2;
};

// As fma_decode::prepare and launch; a block has 32 * WC * WT threads.
template <typename T, int WC, int WT, int KQ, int KN>
int prepare(size_t smem);

template <typename T, int WC, int WT, int KQ, int KN>
void launch(const DecodeBuffers& buf, const Shape& s, dim3 grid, size_t smem, cudaStream_t stream);

}  // namespace mma_decode

// The warp-stream kernel (mla_decode_warp.cuh): 16-bit caches, sm_80+,
// narrow latents. It takes the cooperative kernel's Shape (kq: k steps of D,
// kn: 8-wide output tiles, both for one warp).
namespace warp_decode {

using Shape = mma_decode::Shape;

// As mma_decode::prepare and launch; a block has 32 * NW threads.
template <typename T, int NW, int S, int NT, int KQ, int KN>
int prepare(size_t smem);

template <typename T, int NW, int S, int NT, int KQ, int KN>
void launch(const DecodeBuffers& buf, const Shape& s, dim3 grid, size_t smem, cudaStream_t stream);

}  // namespace warp_decode

// The Hopper kernel (mla_decode_wgmma.cuh): 16-bit and quantized caches,
// sm_90a builds on sm_90 GPUs, R up to 512 a block and a 64-token tile of
// rows that fits shared memory.
namespace wgmma_decode {

constexpr int kTileTokens = 64;    // tokens per tile: the M of both products
constexpr int kRowsPerGroup = 32;  // query rows per warpgroup: the N of both products

struct Shape {
  int B, Q, n_h, R, rope2, n_kv, D;
  int block_size, max_blocks, num_blocks;
  int M;         // query rows per sequence: Q * n_h
  int rc, pc;    // latent and rope columns of a row one block takes (R and D - R
                 // without a cluster; R / C and (D - R) / C in a cluster of C)
  int dp;        // rc + pc padded to whole 64-wide column blocks (the padding is zero)
  int r_blocks;  // 64-wide blocks of rc the output covers (<= 8)
  int num_splits;
  float scale_log2;
  // > 0: tiles arrive by TMA, in boxes of this many rows (one block of the
  // cache, or 64 rows of a larger one) x 64 columns, described by cache_map
  // (the cache as a [num_blocks * block_size x D] matrix, 128-byte
  // swizzle); 0: the threads copy them (cp.async).
  int box_rows;
  CUtensorMap cache_map;
  // Quantized rows (kernels instantiated for kFp8 or kInt4; docs/ops.md,
  // "Quantized caches"): the cache is uint8 rows of row_bytes, [codes |
  // float32 scales, one per group of channels | rope keys in T | pad].
  // Each tile's slice of those bytes (raw_slice.h) is copied raw (cp.async)
  // into a ring of raw_stages (1 or 2) tiles of raw_stride bytes a row,
  // then turned into the tile wgmma reads (the codes as T, the scales
  // beside it).
  int row_bytes, scale_offset, rope_offset, group;
  int raw_stages, raw_stride;
};

// What a quantized cache row holds, as the Hopper kernel's instantiations
// name it: 16-bit rows, or fp8 / int4 codes with scales.
enum class CacheRows : int { k16Bit = 0, kFp8 = 1, kInt4 = 2 };

// As mma_decode::prepare and launch; a block has NG warpgroups (128 * NG
// threads), each taking 32 query rows, and C blocks (a cluster, consecutive
// in x) split each row; F says what the cache rows hold.
template <typename T, int NG, int C, CacheRows F>
int prepare(size_t smem);
// The clusters of C blocks the GPU holds at once, after prepare(smem); 0 for C == 1.
template <typename T, int NG, int C, CacheRows F>
int max_clusters(size_t smem);
template <typename T, int NG, int C, CacheRows F>
void launch(const DecodeBuffers& buf, const Shape& s, dim3 grid, size_t smem, cudaStream_t stream);
}  // namespace wgmma_decode

// The configurations of the Hopper kernel: X(name, NG, C) with NG
// warpgroups of 32 query rows per block and clusters of C blocks splitting
// each row. Tried first where the build and the GPU allow it and a sequence
// has more than 16 query rows: one warpgroup up to 32 rows (Llama-3-8B's 32
// heads), two above (DeepSeek's 128 heads take two blocks), where the row
// fits one block's shared memory and the latent is at most 512 wide. The
// cluster configurations split rows too wide for one block (Llama-2-7B's
// 1024-2560) over 2 or 4 blocks, the smaller cluster first, for up to 32
// query rows (bench/studies/decode_configs.py times them against the
// cooperative kernel).
#define MLA_WGMMA_CONFIGS(X) \
  X("wgmma_g1", 1, 1)         \
  X("wgmma_g2", 2, 1)         \
  X("wgmma_g1_c2", 1, 2)      \
  X("wgmma_g1_c4", 1, 4)

// The configurations of the tensor-core kernel, the one list that both the
// host's table (mla_attention.cu) and the instantiation files expand:
// X(name, WC, WT, KQ, KN) with WC warps over output columns, WT warp groups
// over tokens, and the most 16-wide k steps (KQ) and 8-wide output tiles (KN)
// one warp keeps in registers. They are tried after the warp-stream
// configurations, in this order, and the first that holds the shape wins:
// SmolLM2-size latents in caches whose block size the warp-stream kernel
// does not take (not a multiple of 16) take 4 independent token groups of
// one warp each; DeepSeek-size (576/512) 4 x 2; Llama-2-7B's 2560/2048
// spreads one token group over 8 warps (16 warps with half the registers
// each spill). MLA_DECODE_KERNEL=<name> forces one.
#define MLA_MMA_CONFIGS(X)                    \
  X("mma_wc1_wt4_kq8_kn12", 1, 4, 8, 12)     \
  X("mma_wc1_wt4_kq16_kn16", 1, 4, 16, 16)   \
  X("mma_wc4_wt2_kq16_kn16", 4, 2, 16, 16)   \
  X("mma_wc8_wt1_kq20_kn32", 8, 1, 20, 32)

// The configurations of the warp-stream kernel: X(name, NW, S, NT, KQ, KN)
// with NW warps per block, each with a ring of S stages of tiles of 16 * NT
// tokens (the block size must be a multiple of the tile), and room for KQ
// 16-wide k steps of D and KN 8-wide output tiles of R. Tried before the
// cooperative kernel, in this order; the first that holds the shape (and
// fits the GPU's shared memory) wins. bench/studies/decode_configs.py times
// them against each other.
#define MLA_WARP_CONFIGS(X)                          \
  X("warp_w8_s2_t16_kq8_kn12", 8, 2, 1, 8, 12)       \
  X("warp_w4_s2_t16_kq16_kn24", 4, 2, 1, 16, 24)     \
  X("warp_w4_s2_t32_kq8_kn12", 4, 2, 2, 8, 12)

}  // namespace mla_cuda
