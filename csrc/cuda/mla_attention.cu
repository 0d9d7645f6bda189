// Absorbed MLA attention over the paged latent cache on CUDA: the op's entry
// point, as csrc/cpu/mla_attention.cpp is on CPU. It checks the arguments,
// picks a decode kernel and its shape, chooses the flash-decoding split,
// launches the kernel and merges the splits.
//
// Every cache row is [c_kv (R) | rope keys of n_kv heads (2r each)]. The score
// of query row m against a row is q_aug[m] . row, where q_aug[m] is q_latent
// followed by q_rope placed in the slot of m's KV head and zeros elsewhere, so
// one dot product over the whole row serves all heads and the row is read once
// for all of them (docs/ops.md). The output is sum_t p_t * row[0:R]. Each
// split of a sequence keeps a running max and sum (online softmax); the
// combine kernel (split_combine.cuh) merges the splits by their log-sum-exp. All sizes come
// from shapes, never from tensor data, so the op never syncs with the host
// and can be captured in a CUDA graph.
//
// Kernels: on sm_90 (built for sm_90a), the Hopper wgmma kernel
// (mla_decode_wgmma.cuh) for 16-bit caches with more than 16 query rows a
// sequence (up to 32 of them in a cluster of 2 or 4 blocks where the row
// does not fit one block); the warp-stream (mla_decode_warp.cuh) and cooperative
// (mla_decode_mma.cuh) tensor-core kernels for 16-bit caches whose rows are
// whole 16-byte chunks on sm_80+; the FMA kernel (mla_decode_fma.cuh) for
// the rest; all are compiled in instantiations/.
// MLA_DECODE_KERNEL picks one by name (decode_kernel_names()). The Hopper
// kernel also serves quantized caches (mla_attention_quantized_wgmma, called
// by quantized_cache.cu): the same products over rows dequantized in
// shared memory.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <cudaTypedefs.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "../ops.h"
#include "common.cuh"
#include "mla_decode.cuh"
#include "split_combine.cuh"

namespace mla_cuda {
namespace {

// Most shared memory the host gives one FMA block: it shrinks the query rows
// per block and the tile until the layout fits.
constexpr size_t kFmaSmemBudget = 200 * 1024;

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shared memory of one block, in bytes, for the FMA kernel's layout (mla_decode_fma.cuh).
size_t smem_bytes(int rows_template, const fma_decode::Shape& p, int elt) {
  const int rows_pad = round_up(rows_template, 4);
  return sizeof(float) * (static_cast<size_t>(rows_template) * p.q_stride +
                          static_cast<size_t>(p.tile) * rows_pad +
                          3 * rows_template +
                          (p.use_red ? static_cast<size_t>(rows_template) * p.out_cols : 0)) +
         sizeof(int64_t) * 2 * p.tile + 2 * static_cast<size_t>(p.tile) * p.row_stride * elt;
}

// The sizes both decode kernels take from the tensors (their parameter
// structs share these field names).
template <typename S>
void fill_shape(S& s, const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                const at::Tensor& block_table, double scale) {
  s.B = q_latent.size(0);
  s.Q = q_latent.size(1);
  s.n_h = q_latent.size(2);
  s.R = q_latent.size(3);
  s.rope2 = q_rope.size(3);
  s.D = cache.size(2);
  s.n_kv = (s.D - s.R) / s.rope2;
  s.block_size = cache.size(1);
  s.max_blocks = block_table.size(1);
  s.num_blocks = cache.size(0);
  s.M = s.Q * s.n_h;
  s.scale_log2 = static_cast<float>(scale) * kLog2e;
}

// Runs one decode kernel: the split (unless the caller forced one), the
// per-split buffers, the kernel on grid (grid_x, splits, B), and the combine
// when there is more than one split. A kernel launched in clusters of
// `cluster` blocks passes max_clusters: one wave is then the clusters the
// GPU holds at once (a cluster's blocks share a GPC, so SMs left over in
// each GPC hold none), which blocks per SM times SMs overstates.
template <typename T, typename Shape>
void run_decode(int (*prepare)(size_t),
                void (*launch)(const DecodeBuffers&, const Shape&, dim3, size_t, cudaStream_t),
                Shape& s, int grid_x, int tile, size_t smem, int64_t num_splits, int num_sms,
                const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                const at::Tensor& block_table, const at::Tensor& seq_lens, at::Tensor& out,
                at::Tensor& lse, int (*max_clusters)(size_t) = nullptr, int cluster = 1) {
  const int per_sm = prepare(smem);
  if (num_splits <= 0) {
    const int resident =
        cluster > 1 ? std::max(max_clusters(smem), 1) * cluster : num_sms * std::max(per_sm, 1);
    num_splits = choose_num_splits(s.B * grid_x, resident, s.max_blocks * s.block_size, tile);
  }
  s.num_splits = static_cast<int>(num_splits);
  const SplitParts parts = split_parts(s.B, s.num_splits, s.M, s.R, q_latent);
  const DecodeBuffers buf{q_latent.data_ptr(), q_rope.data_ptr(), cache.data_ptr(),
                          block_table.data_ptr<int>(), seq_lens.data_ptr<int>(), out.data_ptr(),
                          lse.data_ptr<float>(), parts.out_ptr(), parts.lse_ptr()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  launch(buf, s, dim3(grid_x, s.num_splits, s.B), smem, stream);
  combine_splits<T>(parts, out, lse, s.B, s.M, s.R, s.num_splits, stream);
}

// ---- which kernel ----

// The tensor-core configurations of MLA_MMA_CONFIGS (mla_decode.cuh), each
// with its compiled kernels per dtype.
struct MmaKernels {
  int (*prepare)(size_t);
  void (*launch)(const DecodeBuffers&, const mma_decode::Shape&, dim3, size_t, cudaStream_t);
};
struct MmaConfig {
  const char* name;
  int wc, wt, kq, kn;
  MmaKernels half, bf16;
};
#define MLA_MMA_TABLE_ENTRY(NAME, WC, WT, KQ, KN)                                  \
  MmaConfig{NAME, WC, WT, KQ, KN,                                                  \
            {&mma_decode::prepare<c10::Half, WC, WT, KQ, KN>,                      \
             &mma_decode::launch<c10::Half, WC, WT, KQ, KN>},                      \
            {&mma_decode::prepare<c10::BFloat16, WC, WT, KQ, KN>,                  \
             &mma_decode::launch<c10::BFloat16, WC, WT, KQ, KN>}},
constexpr MmaConfig kMmaConfigs[] = {MLA_MMA_CONFIGS(MLA_MMA_TABLE_ENTRY)};
#undef MLA_MMA_TABLE_ENTRY
constexpr int kNumMmaConfigs = static_cast<int>(std::size(kMmaConfigs));

// The warp-stream configurations of MLA_WARP_CONFIGS, likewise.
struct WarpConfig {
  const char* name;
  int nw, stages, nt, kq, kn;
  MmaKernels half, bf16;
};
#define MLA_WARP_TABLE_ENTRY(NAME, NW, S, NT, KQ, KN)                              \
  WarpConfig{NAME, NW, S, NT, KQ, KN,                                              \
             {&warp_decode::prepare<c10::Half, NW, S, NT, KQ, KN>,                 \
              &warp_decode::launch<c10::Half, NW, S, NT, KQ, KN>},                 \
             {&warp_decode::prepare<c10::BFloat16, NW, S, NT, KQ, KN>,             \
              &warp_decode::launch<c10::BFloat16, NW, S, NT, KQ, KN>}},
constexpr WarpConfig kWarpConfigs[] = {MLA_WARP_CONFIGS(MLA_WARP_TABLE_ENTRY)};
#undef MLA_WARP_TABLE_ENTRY
constexpr int kNumWarpConfigs = static_cast<int>(std::size(kWarpConfigs));

// The Hopper configurations of MLA_WGMMA_CONFIGS, likewise.
struct WgmmaKernels {
  int (*prepare)(size_t);
  int (*max_clusters)(size_t);
  void (*launch)(const DecodeBuffers&, const wgmma_decode::Shape&, dim3, size_t, cudaStream_t);
};
using wgmma_decode::CacheRows;
struct WgmmaConfig {
  const char* name;
  int ng, c;
  WgmmaKernels half[3], bf16[3];  // by CacheRows: 16-bit, fp8, int4 rows
};
#define MLA_WGMMA_KERNELS(T, NG, C, F)                                                              \
  WgmmaKernels{&wgmma_decode::prepare<T, NG, C, F>, &wgmma_decode::max_clusters<T, NG, C, F>,       \
               &wgmma_decode::launch<T, NG, C, F>}
#define MLA_WGMMA_FORMATS(T, NG, C)                                                                 \
  {MLA_WGMMA_KERNELS(T, NG, C, CacheRows::k16Bit), MLA_WGMMA_KERNELS(T, NG, C, CacheRows::kFp8),    \
   MLA_WGMMA_KERNELS(T, NG, C, CacheRows::kInt4)}
#define MLA_WGMMA_TABLE_ENTRY(NAME, NG, C) \
  WgmmaConfig{NAME, NG, C, MLA_WGMMA_FORMATS(c10::Half, NG, C), MLA_WGMMA_FORMATS(c10::BFloat16, NG, C)},
constexpr WgmmaConfig kWgmmaConfigs[] = {MLA_WGMMA_CONFIGS(MLA_WGMMA_TABLE_ENTRY)};
#undef MLA_WGMMA_TABLE_ENTRY
#undef MLA_WGMMA_FORMATS
#undef MLA_WGMMA_KERNELS
constexpr int kNumWgmmaConfigs = static_cast<int>(std::size(kWgmmaConfigs));

// The kernel choice: kAutoKernel (the first Hopper, warp-stream, then
// cooperative configuration that holds the shape, else FMA), kFmaKernel, or
// an index into the configurations, warp-stream ones first, then
// cooperative, then Hopper (that configuration where it holds the shape,
// else FMA).
constexpr int kAutoKernel = -1;
constexpr int kFmaKernel = -2;
constexpr int kFirstWgmma = kNumWarpConfigs + kNumMmaConfigs;
constexpr int kNumConfigs = kFirstWgmma + kNumWgmmaConfigs;

std::string kernel_name(int choice) {
  if (choice == kAutoKernel) return "auto";
  if (choice == kFmaKernel) return "fma";
  if (choice >= kFirstWgmma) return kWgmmaConfigs[choice - kFirstWgmma].name;
  return choice < kNumWarpConfigs ? kWarpConfigs[choice].name : kMmaConfigs[choice - kNumWarpConfigs].name;
}

// `shown` is how the error names where `name` came from.
int kernel_by_name(const std::string& name, const std::string& shown) {
  for (int choice = kFmaKernel; choice < kNumConfigs; ++choice)
    if (name == kernel_name(choice)) return choice;
  std::string names;
  for (const std::string& n : decode_kernel_names()) names += (names.empty() ? "" : ", ") + n;
  TORCH_CHECK(false, "mla_cuda: ", shown, " names no decode kernel; use one of: ", names);
}

// MLA_DECODE_KERNEL is read once, at the first call: the op runs in hot
// loops and inside CUDA graphs, where an environment lookup per call is
// waste. An unknown name fails that call (and every later one).
std::atomic<int>& kernel_choice() {
  static std::atomic<int> choice{[] {
    const char* env = std::getenv("MLA_DECODE_KERNEL");
    if (env == nullptr || *env == '\0') return kAutoKernel;
    return kernel_by_name(env, std::string("MLA_DECODE_KERNEL=") + env);
  }()};
  return choice;
}

// ---- tensor-core path ----

// The cooperative kernel's shared memory (mla_decode_mma.cuh): two stages
// of tiles, the score partials and row statistics; at the end the merged
// output reuses the tiles.
size_t mma_smem_bytes(const MmaConfig& c, int row_stride, int R, int elt) {
  const size_t tiles = 2 * static_cast<size_t>(16 * c.wt) * row_stride * elt;
  const size_t merged = c.wt > 1 ? sizeof(float) * 16 * static_cast<size_t>(R) : 0;
  return std::max(tiles, merged) + sizeof(float) * ((c.wc > 1 ? c.wt * c.wc * 32 * 8 : 0) + c.wt * 16 * 2);
}

bool mma_decode_allowed(const at::Tensor& q_latent, const at::Tensor& cache, int choice) {
  if (choice == kFmaKernel) return false;
  if (q_latent.scalar_type() != at::kHalf && q_latent.scalar_type() != at::kBFloat16) return false;
  if (cache.size(2) % 8 != 0 || !is_aligned16(cache.data_ptr())) return false;
  // The kernels read q_latent as 32-bit pairs.
  if ((reinterpret_cast<uintptr_t>(q_latent.data_ptr()) & 3) != 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q_latent.get_device()));
  return major >= 8;
}

// The shape both tensor-core kernels start from: the tensors' sizes, D in
// 16-wide k steps and the padded shared-memory row; smem_limit is the
// opt-in shared memory of the device.
mma_decode::Shape tensor_core_shape(const at::Tensor& q_latent, const at::Tensor& q_rope,
                                    const at::Tensor& cache, const at::Tensor& block_table, double scale,
                                    int& smem_limit) {
  mma_decode::Shape s{};
  fill_shape(s, q_latent, q_rope, cache, block_table, scale);
  s.k_steps = (s.D + 15) / 16;
  s.row_stride = s.k_steps * 16 + 8;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        q_latent.get_device()));
  return s;
}

// Runs a chosen tensor-core kernel (its half and bfloat16 instantiations)
// over 16-row query tiles, with splits of at least `tile` tokens.
void run_tensor_core_decode(const MmaKernels& half_kernels, const MmaKernels& bf16_kernels,
                            mma_decode::Shape& s, int tile, size_t smem, const at::Tensor& q_latent,
                            const at::Tensor& q_rope, const at::Tensor& cache, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, int64_t num_splits, at::Tensor& out, at::Tensor& lse,
                            int num_sms) {
  const int m_tiles = (s.M + 15) / 16;
  const bool half = q_latent.scalar_type() == at::kHalf;
  const MmaKernels& k = half ? half_kernels : bf16_kernels;
  auto run = [&](auto tag) {
    run_decode<decltype(tag)>(k.prepare, k.launch, s, m_tiles, tile, smem, num_splits, num_sms, q_latent,
                              q_rope, cache, block_table, seq_lens, out, lse);
  };
  if (half) run(c10::Half{});
  else run(c10::BFloat16{});
}

// ---- Hopper path ----

// Shared memory of the Hopper kernel (mla_decode_wgmma.cuh): q_aug, two
// stages of 64 rows (one over quantized rows), P^T and the column-max
// exchange, each row padded to dp, in a cluster the reduce-scatter and
// all-gather buffers (16 floats a thread each), the two stages' TMA
// barriers and bad-box masks, and over quantized rows the raw ring (the
// tile's per-token scales, then raw_stages tiles of raw_stride bytes a row,
// 16-byte aligned); 1024 bytes to align the first operand to the swizzle.
size_t wgmma_smem_bytes(const WgmmaConfig& c, const wgmma_decode::Shape& s, bool quantized) {
  const size_t rows = wgmma_decode::kRowsPerGroup * static_cast<size_t>(c.ng), dp = s.dp;
  const size_t tile = wgmma_decode::kTileTokens, threads = 128 * static_cast<size_t>(c.ng);
  const size_t stages = quantized ? 1 : 2;
  return 1024 + 2 * (rows * dp + stages * tile * dp + rows * tile) + sizeof(float) * c.ng * 4 * 32 +
         (c.c > 1 ? sizeof(float) * 2 * 16 * threads : 0) + 2 * (sizeof(uint64_t) + sizeof(unsigned)) +
         (quantized ? sizeof(float) * tile + 16 + static_cast<size_t>(s.raw_stages) * tile * s.raw_stride : 0);
}

// The driver's cuTensorMapEncodeTiled, found through the runtime (no link
// against libcuda), or null where the driver has none.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// Sets the Hopper kernel up to stage its tiles by TMA where it can: cache
// blocks that tile the 64-token tile exactly (a block size of 8, 16, 32 or
// 64, or a multiple of 64: a box is one block, or 64 rows of one), in a
// cluster slices of whole 64-column boxes (a box never reaches into the
// next slice), and rows a 32-bit TMA coordinate reaches
// (check_attention_args has made the cache contiguous).
// Otherwise (or if the driver refuses the map) box_rows stays 0 and the
// threads copy the tiles.
void wgmma_tensor_map(const WgmmaConfig& c, const at::Tensor& cache, wgmma_decode::Shape& s) {
  s.box_rows = 0;
  const int bs = s.block_size, tile = wgmma_decode::kTileTokens;
  const bool boxes_tile = (tile % bs == 0 && bs % 8 == 0) || bs % tile == 0;
  const bool whole_boxes = c.c == 1 || (s.rc % 64 == 0 && s.pc % 64 == 0);
  if (!whole_boxes || !boxes_tile || static_cast<int64_t>(s.num_blocks) * bs >= (int64_t{1} << 31)) return;
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(s.D), static_cast<cuuint64_t>(s.num_blocks) * bs};
  const cuuint64_t row_bytes[1] = {static_cast<cuuint64_t>(s.D) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(std::min(bs, tile))};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult r = encode(&s.cache_map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, cache.data_ptr(), dims, row_bytes, box,
                            steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r == CUDA_SUCCESS) s.box_rows = static_cast<int>(box[1]);
}

// The row slice one block of configuration c takes, or false where c does
// not hold the shape: a cluster splits the latent into whole 64-column
// blocks and the rope part into whole 16-byte chunks (quantized rows: equal
// parts; the block copies the chunks holding them; the latent part whole
// 64-column blocks, which the per-token scale multiplies apart from the rope
// blocks). For quantized rows (f) it also sets raw_stride, by the widest
// slice.
bool wgmma_slice(const WgmmaConfig& c, wgmma_decode::Shape& s, CacheRows f) {
  const int rope = s.D - s.R;
  const bool quantized = f != CacheRows::k16Bit;
  if (c.c > 1 && (s.R % (64 * c.c) != 0 || rope % (quantized ? c.c : 8 * c.c) != 0)) return false;
  s.rc = s.R / c.c;
  s.pc = rope / c.c;
  s.dp = round_up(s.rc + s.pc, 64);
  s.r_blocks = (s.rc + 63) / 64;
  // The copy loop (and the dequantization) gives a lane 3 of a row's 16-byte chunks.
  constexpr int kMaxRowChunks = 3 * 32;
  if (s.r_blocks > 8 || s.rc + s.pc > kMaxRowChunks * 8) return false;
  if (!quantized) return true;
  if (s.rc % 64 != 0) return false;
  int widest = 0;
  for (int slice = 0; slice < c.c; ++slice) {
    const RawSlice r =
        raw_slice(s.row_bytes, s.scale_offset, s.rope_offset, s.group, s.rc, s.pc, f == CacheRows::kFp8, c.c, slice);
    widest = std::max(widest, r.chunks);
  }
  s.raw_stride = 16 * widest;
  return widest <= kMaxRowChunks;
}

// Runs the Hopper kernel if the build has it (sm_90a), the GPU is sm_90 and
// a configuration holds the shape; false leaves the call to the others. The
// automatic choice leaves sequences of 16 query rows or fewer (SmolLM2's 9
// heads) to the warp-stream kernels, as they would fill half of the N side.
// `quant` (null for 16-bit caches) is the layout of quantized rows (a
// scale per token, or per group of a multiple of 8 channels), whose rope
// part holds kv_heads keys; their raw ring holds two tiles where shared
// memory allows, else one.
bool try_wgmma_decode(const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                      int64_t num_splits, at::Tensor& out, at::Tensor& lse, int num_sms, int choice,
                      const QuantLayout* quant = nullptr, int64_t kv_heads = 0) {
#ifndef MLA_SM90A
  return false;
#else
  if (choice >= 0 && choice < kFirstWgmma) return false;
  if (!mma_decode_allowed(q_latent, cache, choice)) return false;
  const int device = q_latent.get_device();
  int major = 0, minor = 0, smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (major != 9 || minor != 0) return false;
  wgmma_decode::Shape s{};
  fill_shape(s, q_latent, q_rope, cache, block_table, scale);
  const CacheRows f = quant == nullptr                     ? CacheRows::k16Bit
                      : quant->kind == QuantKind::kFp8 ? CacheRows::kFp8
                                                           : CacheRows::kInt4;
  if (quant != nullptr) {
    s.n_kv = static_cast<int>(kv_heads);
    s.D = s.R + s.n_kv * s.rope2;
    s.row_bytes = static_cast<int>(quant->row_bytes);
    s.scale_offset = static_cast<int>(quant->scale_offset);
    s.rope_offset = static_cast<int>(quant->rope_offset);
    s.group = static_cast<int>(quant->group);
  }
  if (choice == kAutoKernel && s.M <= 16) return false;
  // a scale per token, or per group of whole 16-byte chunks of codes (8 channels)
  if (quant != nullptr && quant->group != quant->R && quant->group % 8 != 0) return false;
  const WgmmaConfig* chosen = nullptr;
  // Automatic: two warpgroups exactly when there are more than 32 rows; a
  // cluster (the smaller first) only for up to 32 rows that no single block
  // holds (Llama-2-7B's 1024-2560 wide rows). Over quantized rows a first
  // pass tries two warpgroups on one block for up to 32 rows too: the
  // second has no query rows, but it takes half of every tile's copies and
  // dequantization, the serial part of a tile there (Llama-3-8B-like 64 x
  // 4k on H100: 0.250 ms against 0.295 fp8, 0.255 against 0.296 int4).
  const bool quant_pass = choice < 0 && quant != nullptr && s.M <= 32;
  for (int pass = quant_pass ? 0 : 1; pass < 2 && chosen == nullptr; ++pass)
    for (int i = 0; i < kNumWgmmaConfigs && chosen == nullptr; ++i) {
      const WgmmaConfig& c = kWgmmaConfigs[i];
      if (pass == 0 ? c.c != 1 || c.ng != 2
                    : choice >= 0 ? i != choice - kFirstWgmma : c.c == 1 ? (s.M > 32) != (c.ng > 1) : s.M > 32)
        continue;
      if (!wgmma_slice(c, s, f)) continue;
      // Quantized rows: two raw tiles in flight where shared memory holds them, else one.
      for (int stages = quant != nullptr ? 2 : 0; stages >= (quant != nullptr ? 1 : 0) && chosen == nullptr;
           --stages) {
        s.raw_stages = stages;
        if (wgmma_smem_bytes(c, s, quant != nullptr) <= static_cast<size_t>(smem_limit)) chosen = &c;
      }
    }
  if (chosen == nullptr) return false;
  const bool half = q_latent.scalar_type() == at::kHalf;
  const WgmmaKernels& k = (half ? chosen->half : chosen->bf16)[static_cast<int>(f)];
  const int rows = wgmma_decode::kRowsPerGroup * chosen->ng;
  const int grid_x = (s.M + rows - 1) / rows * chosen->c;
  const size_t smem = wgmma_smem_bytes(*chosen, s, quant != nullptr);
  if (quant == nullptr) wgmma_tensor_map(*chosen, cache, s);
  else s.box_rows = 0;
  auto run = [&](auto tag) {
    run_decode<decltype(tag)>(k.prepare, k.launch, s, grid_x, wgmma_decode::kTileTokens, smem, num_splits,
                              num_sms, q_latent, q_rope, cache, block_table, seq_lens, out, lse, k.max_clusters,
                              chosen->c);
  };
  if (half) run(c10::Half{});
  else run(c10::BFloat16{});
  return true;
#endif
}

// Runs the tensor-core kernel if a configuration holds the shape; false
// leaves the call to the FMA kernel.
bool try_mma_decode(const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                    const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                    int64_t num_splits, at::Tensor& out, at::Tensor& lse, int num_sms, int choice) {
  if (!mma_decode_allowed(q_latent, cache, choice)) return false;
  int smem_limit = 0;
  mma_decode::Shape s = tensor_core_shape(q_latent, q_rope, cache, block_table, scale, smem_limit);
  const int out_tiles = (s.R + 7) / 8;
  const int elt = q_latent.element_size();
  const MmaConfig* chosen = nullptr;
  for (int i = 0; i < kNumMmaConfigs && chosen == nullptr; ++i) {
    if (choice >= 0 && i != choice - kNumWarpConfigs) continue;
    const MmaConfig& c = kMmaConfigs[i];
    const int kq = (s.k_steps + c.wc - 1) / c.wc;
    const int kn = round_up((out_tiles + c.wc - 1) / c.wc, 2);
    if (kq <= c.kq && kn <= c.kn &&
        mma_smem_bytes(c, s.row_stride, s.R, elt) <= static_cast<size_t>(smem_limit)) {
      chosen = &c;
      s.kq = kq;
      s.kn = kn;
    }
  }
  if (chosen == nullptr) return false;
  run_tensor_core_decode(chosen->half, chosen->bf16, s, 16 * chosen->wt,
                         mma_smem_bytes(*chosen, s.row_stride, s.R, elt), q_latent, q_rope,
                         cache, block_table, seq_lens, num_splits, out, lse, num_sms);
  return true;
}

// ---- warp-stream path ----

size_t warp_smem_bytes(const WarpConfig& c, int row_stride, int R, int elt) {
  const size_t rings = static_cast<size_t>(c.nw) * c.stages * 16 * c.nt * row_stride * elt;
  const size_t merge = sizeof(float) * (static_cast<size_t>(c.nw) * 16 * 2 + 16 * 2 +
                                        static_cast<size_t>(c.nw) * 16 * R);
  return std::max(rings, merge);
}

// Runs the warp-stream kernel if a configuration holds the shape; false
// leaves the call to the cooperative kernel.
bool try_warp_decode(const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                     int64_t num_splits, at::Tensor& out, at::Tensor& lse, int num_sms, int choice) {
  if (choice >= kNumWarpConfigs || !mma_decode_allowed(q_latent, cache, choice)) return false;
  int smem_limit = 0;
  mma_decode::Shape s = tensor_core_shape(q_latent, q_rope, cache, block_table, scale, smem_limit);
  s.kq = s.k_steps;
  s.kn = round_up((s.R + 7) / 8, 2);
  const WarpConfig* chosen = nullptr;
  for (int i = 0; i < kNumWarpConfigs && chosen == nullptr; ++i) {
    if (choice >= 0 && i != choice) continue;
    const WarpConfig& c = kWarpConfigs[i];
    // A tile lies inside one cache block.
    if (s.kq <= c.kq && s.kn <= c.kn && s.block_size % (16 * c.nt) == 0 &&
        warp_smem_bytes(c, s.row_stride, s.R, q_latent.element_size()) <= static_cast<size_t>(smem_limit))
      chosen = &c;
  }
  if (chosen == nullptr) return false;
  // A split gives every warp of its block at least one tile.
  run_tensor_core_decode(chosen->half, chosen->bf16, s, 16 * chosen->nt * chosen->nw,
                         warp_smem_bytes(*chosen, s.row_stride, s.R, q_latent.element_size()), q_latent,
                         q_rope, cache, block_table, seq_lens, num_splits, out, lse, num_sms);
  return true;
}

}  // namespace

bool mla_attention_quantized_wgmma(const at::Tensor& q_latent, const at::Tensor& q_rope,
                                   const at::Tensor& latent_cache, const at::Tensor& block_table,
                                   const at::Tensor& seq_lens, double scale, const QuantLayout& layout,
                                   int64_t kv_heads, at::Tensor& out, at::Tensor& lse) {
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q_latent.get_device()));
  return try_wgmma_decode(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, 0, out, lse, num_sms,
                          kernel_choice().load(), &layout, kv_heads);
}

std::vector<std::string> decode_kernel_names() {
  std::vector<std::string> names{kernel_name(kAutoKernel), kernel_name(kFmaKernel)};
  for (const WarpConfig& c : kWarpConfigs) names.emplace_back(c.name);
  for (const MmaConfig& c : kMmaConfigs) names.emplace_back(c.name);
  for (const WgmmaConfig& c : kWgmmaConfigs) names.emplace_back(c.name);
  return names;
}

std::string decode_kernel() { return kernel_name(kernel_choice().load()); }

void set_decode_kernel(const std::string& name) {
  kernel_choice().store(kernel_by_name(name, "'" + name + "'"));
}

std::tuple<at::Tensor, at::Tensor> mla_attention_cuda(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, int64_t num_splits) {
  check_attention_args(q_latent, q_rope, latent_cache, block_table, seq_lens);
  const c10::cuda::OptionalCUDAGuard guard(q_latent.device());
  fma_decode::Shape p{};
  fill_shape(p, q_latent, q_rope, latent_cache, block_table, scale);
  at::Tensor out = at::empty_like(q_latent);
  at::Tensor lse = at::empty({p.B, p.Q, p.n_h}, q_latent.options().dtype(at::kFloat));
  if (p.B == 0 || p.M == 0) return {out, lse};
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount,
                                        q_latent.get_device()));
  TORCH_CHECK(num_splits <= kMaxSplits, "mla_cuda: num_splits is at most ",
              kMaxSplits, ", got ", num_splits);
  const int choice = kernel_choice().load();
  if (try_wgmma_decode(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, num_splits,
                       out, lse, num_sms, choice) ||
      try_warp_decode(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, num_splits,
                      out, lse, num_sms, choice) ||
      try_mma_decode(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, num_splits,
                     out, lse, num_sms, choice))
    return {out, lse};

  // ---- FMA path ----
  using fma_decode::kThreads;
  const int elt = q_latent.element_size();
  const int V = 16 / elt;
  const bool vectorized = p.D % V == 0 && is_aligned16(latent_cache.data_ptr());
  // Rows of the staged tile and of q_aug padded to whole 16-byte chunks; an
  // odd number of chunks per tile row keeps 8 threads reading 8 rows free of
  // shared-memory bank conflicts.
  p.q_stride = round_up(p.D, V);
  p.row_stride = p.q_stride + ((p.q_stride / V) % 2 == 0 ? V : 0);
  p.out_cols = std::min(p.R, kThreads * V);
  {  // A single token group (n_dv > kThreads/2 in every column chunk) needs no merge.
    const int last = p.R - (p.R - 1) / p.out_cols * p.out_cols;
    const int n_dv_full = (p.out_cols + V - 1) / V, n_dv_last = (last + V - 1) / V;
    p.use_red = !(n_dv_full > kThreads / 2 && n_dv_last > kThreads / 2);
  }

  // Query rows per block (up to 16, balanced over head chunks) and tokens per
  // tile (kThreads / lanes): the most rows, then the largest tile, that fit.
  int rows_template = 16;
  for (int rows_cap = std::min(p.M, 16);; rows_cap = (rows_cap + 1) / 2) {
    p.head_chunks = (p.M + rows_cap - 1) / rows_cap;
    p.rows = (p.M + p.head_chunks - 1) / p.head_chunks;
    rows_template = p.rows <= 4 ? 4 : p.rows <= 8 ? 8 : 16;
    for (p.lanes = 1;; p.lanes *= 2) {
      p.tile = kThreads / p.lanes;
      if (smem_bytes(rows_template, p, elt) <= kFmaSmemBudget || p.lanes == 32) break;
    }
    if (smem_bytes(rows_template, p, elt) <= kFmaSmemBudget || rows_cap == 1) break;
  }
  const size_t smem = smem_bytes(rows_template, p, elt);
  TORCH_CHECK(smem <= kFmaSmemBudget, "mla_cuda: a cache row of ", p.D,
              " values is too wide for the decode kernel's shared memory");
  const int col_chunks = (p.R + p.out_cols - 1) / p.out_cols;
  MLA_DISPATCH_FLOAT_TYPES(
      q_latent.scalar_type(), "mla_attention_cuda", [&] {
        auto run = [&](auto prepare, auto launch) {
          run_decode<scalar_t>(prepare, launch, p, p.head_chunks * col_chunks, p.tile, smem,
                               num_splits, num_sms, q_latent, q_rope, latent_cache, block_table,
                               seq_lens, out, lse);
        };
        auto by_rows = [&](auto vec_tag) {
          constexpr bool kV = decltype(vec_tag)::value;
          if (rows_template == 4) run(fma_decode::prepare<scalar_t, 4, kV>, fma_decode::launch<scalar_t, 4, kV>);
          else if (rows_template == 8) run(fma_decode::prepare<scalar_t, 8, kV>, fma_decode::launch<scalar_t, 8, kV>);
          else run(fma_decode::prepare<scalar_t, 16, kV>, fma_decode::launch<scalar_t, 16, kV>);
        };
        if (vectorized) by_rows(std::true_type{});
        else by_rows(std::false_type{});
      });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("mla_attention", &mla_attention_cuda);
}

}  // namespace mla_cuda
