// Hopper decode kernel (wgmma, sm_90a) for 16-bit and quantized caches: the
// path for many query heads over a latent that fits a 64-token tile in
// shared memory (DeepSeek-size 512 + 64, GQA models such as Llama-3-8B at
// d_kv = 64).
//
// Same contract and output layout as the other decode kernels. Both products
// run transposed, with the 64 tokens of a tile as the M side of the
// warpgroup product and the query rows as N:
//   S^T[64 x 32] = rows[64 x D] . q_aug[32 x D]^T     (A: the tile, K-major)
//   O^T[R x 32] += rows^T[R x 64] . P^T[64 x 32]      (A: the same tile, M-major)
// so a tile staged once feeds both products, as few as 32 query rows fill
// the N side without padding (an M side of heads would waste half of
// wgmma's 64 rows at 32 heads), and the softmax's per-row factors are
// per-column factors of both accumulators: rescaling O needs no exchange.
//
// A block takes NG warpgroups of 32 query rows each (the Q * n_h (token,
// head) pairs of a sequence) and one split of the sequence. The warpgroups
// share the staged tiles (two stages) and are otherwise independent. The
// copy engine stages a tile (TMA: warp 0 asks for boxes of 64 columns by
// one cache block's rows, one block-table lookup per box; the engine
// writes them swizzled as wgmma reads them and completes the stage's
// mbarrier) where the cache's blocks tile the 64 tokens exactly (and, in a
// cluster, a block's slice is whole 64-column blocks); otherwise the
// threads copy it row by row (cp.async, one lookup per row). Each
// warpgroup computes its scores, its softmax (the column max over the
// tile's 64 tokens through a named barrier of its 4 warps) and its P^T,
// and accumulates O^T for its rows in registers (R up to 512: 8 blocks of
// 64 x 32 floats). P is rounded to the cache's
// 16-bit type for the second product, as in the other tensor-core kernels;
// scores, the softmax state and the accumulators stay float32.
//
// Wider latents (Llama-2-7B: R = 2048 + 512 rope columns, 32 heads) split
// every row over a cluster of C blocks (C = 2 or 4): block c stages its
// slice of each row (latent columns [c R/C, (c+1) R/C) and rope columns
// [R + c P/C, R + (c+1) P/C), P = n_kv * 2r), computes partial scores over
// it, and the partials are summed across the cluster through distributed
// shared memory: each block sums 16/C of every thread's 16 fragment values
// (reduce-scatter, in rank order: reproducible), then hands its sums to all
// (all-gather), two cluster barriers a tile. Every block then runs the same
// softmax and accumulates O^T for its own slice of R. (The host takes
// these configurations for up to 32 query rows whose row one block does
// not hold: see MLA_WGMMA_CONFIGS.)
//
// Quantized rows (fp8 or int4 codes with one float32 scale per token, rope
// keys in T: csrc/quantized_format.h) take the same products. The threads
// copy each tile's bytes raw (cp.async; only this block's slice of a row)
// into a ring of one or two raw tiles and, once the tile before it is done,
// turn it into the one tile wgmma reads: the codes as T (every e4m3 value
// and int4 code is exact in fp16 and bf16), the rope keys as they are, the
// token's scale beside it in float32. The scale then multiplies the latent
// part of each score (the latent column blocks run first, the rope blocks
// accumulate onto the scaled sum) and each token's P before it is rounded
// to T, as in mla_decode_quant.cuh: scores and the log-sum-exp come out
// as exact as over 16-bit rows, and the dequantized tile never exists
// outside shared memory. Rows with a scale per group of channels (groups
// of whole 8-channel chunks) go into the tile as values instead, each
// chunk times its group's scale and rounded to T, and need no scale on the
// scores or P.
//
// Shared memory, every operand in the 128-byte-swizzled layout of
// wgmma.cuh: q_aug [NG * 32 x dp], two stages of [64 x dp] rows (dp: this
// block's columns padded to whole 64-wide blocks, the padding zero), P^T
// [NG * 32 x 64], the column-max exchange, in a cluster the
// reduce-scatter and all-gather buffers, and the two stages' mbarriers and
// bad-box masks (TMA path); quantized rows have one stage and the raw ring.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "cluster.cuh"
#include "common.cuh"
#include "../quantized_format.h"
#include "mla_decode.cuh"
#include "mma_sync.cuh"
#include "quant_codes.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace mla_cuda {
namespace wgmma_decode {

// Eight latent codes of a chunk as T, exactly (fp8: two words, low byte
// first; int4: one word, low nibble first), by quant_codes.cuh's pairs (fp8
// to bf16 by spreading the bits, without the conversions through float).
template <typename T, CacheRows F>
__device__ __forceinline__ uint4 dequantize_chunk(uint2 codes) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  uint32_t out[4];
  if constexpr (F == CacheRows::kFp8) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const uint32_t word = h < 2 ? codes.x : codes.y;
      if constexpr (kBf16) {
        out[h] = fp8x2_spread_to_bf16(__byte_perm(word, 0, h % 2 ? 0x4342 : 0x4140));  // a code in each half's low byte
      } else {
        out[h] = fp8x2_to<T>(word >> (16 * (h % 2)));
      }
    }
  } else {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const uint32_t t = (codes.x >> (8 * h)) & 0xFFu;  // codes 2h, 2h + 1
      out[h] = int4x2_from_low_nibbles<T>(t | (t << 12));
    }
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// A dequantized chunk times its group's scale (rows with a scale per group
// of channels; a chunk lies in one group: host check), rounded to T.
template <typename T>
__device__ __forceinline__ uint4 scale_chunk(uint4 v, float scale) {
  return make_uint4(scale_pair<T>(v.x, scale, scale), scale_pair<T>(v.y, scale, scale),
                    scale_pair<T>(v.z, scale, scale), scale_pair<T>(v.w, scale, scale));
}

template <typename T, int NG, int C, CacheRows F>
__global__ void __launch_bounds__(128 * NG, 1)
mla_decode_wgmma_kernel(const T* __restrict__ q_latent, const T* __restrict__ q_rope,
                        const T* __restrict__ cache, const int* __restrict__ block_table,
                        const int* __restrict__ seq_lens, T* __restrict__ out,
                        float* __restrict__ lse, float* __restrict__ part_out,
                        float* __restrict__ part_lse, const __grid_constant__ Shape p) {
#ifdef MLA_WGMMA_ENABLED
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  constexpr int kThreads = 128 * NG, kWarps = 4 * NG;
  constexpr int kRows = kRowsPerGroup * NG;  // query rows per block
  static_assert(C == 1 || C == 2 || C == 4, "a cluster of 1, 2 or 4 blocks");
  static_assert(NG == 1 || NG == 2, "one or two warpgroups (the outputs' staging at the end counts on it)");
  constexpr bool kQuant = F != CacheRows::k16Bit;
  constexpr int kStages = kQuant ? 1 : 2;  // 16-bit tiles in flight; a quantized tile is dequantized into one
  // P * scale's factor in fp16 (quant_codes.cuh); 16-bit rows have no scale.
  constexpr float kPFactor = kQuant ? mla_cuda::kPFactor<T, F == CacheRows::kFp8> : 1.f;
  constexpr int kShare = 16 / C;  // fragment values of each thread one block of a cluster sums
  extern __shared__ unsigned char smem_raw[];
  // The swizzle pattern repeats every 1024 bytes: operands start on it.
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((1024 - (raw_addr & 1023)) & 1023);
  const uint32_t q_bytes = kRows * p.dp * 2, stage_bytes = kTileTokens * p.dp * 2;
  unsigned char* q_s = smem;
  unsigned char* stage_s = q_s + q_bytes;                // [kStages][64 x dp]
  unsigned char* pt_s = stage_s + kStages * stage_bytes;  // [kRows x 64]
  float* red_s = reinterpret_cast<float*>(pt_s + kRows * 128);  // [NG][4 warps][32 columns]
  constexpr int kExchange = C > 1 ? C * kThreads * kShare : 0;  // floats of each cluster buffer
  float* scatter_s = red_s + NG * 4 * 32;  // [C sources][kThreads][kShare] partials
  float* gather_s = scatter_s + kExchange;  // [C sources][kThreads][kShare] sums
  // TMA path: a barrier per stage (its tile has landed) and the stage's
  // tile's mask of boxes with an out-of-range block id.
  uint64_t* landed_s = reinterpret_cast<uint64_t*>(gather_s + kExchange);  // [2]
  unsigned* bad_boxes_s = reinterpret_cast<unsigned*>(landed_s + 2);       // [2]
  // Quantized rows: the staged tile's per-token scales [64], then the raw
  // ring, [raw_stages][64 x raw_stride bytes], 16-byte aligned.
  float* tile_scale_s = reinterpret_cast<float*>(bad_boxes_s + 2);
  unsigned char* raw_s =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(tile_scale_s + kTileTokens) + 15) & ~uintptr_t{15});
  const int raw_tile_bytes = kTileTokens * p.raw_stride;
  const uint32_t q_addr = static_cast<uint32_t>(__cvta_generic_to_shared(q_s));
  const uint32_t stage_addr = static_cast<uint32_t>(__cvta_generic_to_shared(stage_s));
  const uint32_t pt_addr = static_cast<uint32_t>(__cvta_generic_to_shared(pt_s));
  const uint32_t landed_addr = static_cast<uint32_t>(__cvta_generic_to_shared(landed_s));

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wg = warp / 4, wwarp = warp % 4;  // warpgroup, warp inside it
  // A cluster's blocks are consecutive in x: one group of query rows, C slices of each row.
  const int slice = blockIdx.x % C, m0 = blockIdx.x / C * kRows, split = blockIdx.y, b = blockIdx.z;
  const int L = seq_lens[b];
  const int split_len = ((L + p.num_splits - 1) / p.num_splits + kTileTokens - 1) / kTileTokens * kTileTokens;
  const int t_begin = min(L, split * split_len);
  const int t_end = min(L, t_begin + split_len);
  const int n_tiles = (t_end - t_begin + kTileTokens - 1) / kTileTokens;
  const int* table = block_table + static_cast<int64_t>(b) * p.max_blocks;
  const int chunks = (p.rc + p.pc + 7) / 8, chunks_p = p.dp / 8;  // 16-byte chunks of this slice: data, padded
  // Column x of this block's slice is column global_col(x) of a cache row
  // (and of q_aug); the latent part, then the rope part (whole 8-column
  // chunks when C > 1; with C == 1 the slice is the row).
  auto global_col = [&](int x) { return x < p.rc ? slice * p.rc + x : p.R + slice * p.pc + (x - p.rc); };

  // ---- the copy side: tile j goes to stage j % 2 (quantized rows: raw
  // slot j % raw_stages, a slice of whole 16-byte chunks of each row as
  // raw_slice lays it out, rows raw_stride apart). A warp copies whole rows
  // (its lanes along the row: coalesced). Everything about a lane's chunks
  // that does not change between tiles (where they sit in the swizzled
  // stage, where they come from in a row) is worked out once here, and the
  // block-table lookups of a warp's rows are made first, one per lane, all
  // in flight together: a tile's copies then cost a few instructions a row
  // (one after another, the lookups and the index arithmetic would cost
  // more than the copies, in a block of only 4 or 8 warps). Rows past the
  // split's end are zero (their P is 0, and 0 * stale NaN would poison O);
  // an out-of-range block id reads as NaN, never out of bounds. One group is
  // committed per tile, issued or not. ----
  constexpr int kRowsPerWarp = kTileTokens / kWarps;
  constexpr int kLaneChunks = 3;  // chunks per lane and row: a row slice is at most 96 chunks (host check)
  const RawSlice raw = kQuant ? raw_slice(p.row_bytes, p.scale_offset, p.rope_offset, p.group, p.rc, p.pc,
                                                  F == CacheRows::kFp8, C, slice)
                                      : RawSlice{};
  const int row_pitch = kQuant ? p.row_bytes : 2 * p.D;     // bytes of a cache row
  const int row_step = kQuant ? p.raw_stride : 128;         // bytes from one staged row to the next
  // Stage offset of the lane's chunk k for rows whose (row % 8) is warp % 8
  // (+ 4): where the threads copy 16-bit rows, or dequantize quantized ones
  // (whose raw copies land at 16 c, row * raw_stride).
  uint32_t chunk_dst[kLaneChunks][2];
  int chunk_src[kLaneChunks];  // byte offset in a cache row; -1: past the slice
#pragma unroll
  for (int k = 0; k < kLaneChunks; ++k) {
    const int c = lane + 32 * k;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row8 = (warp + 4 * h) % 8;  // the row's place in its 8-row group; + row * 128 per row
      chunk_dst[k][h] = wgmma::swizzled_offset(kTileTokens, row8, c) - row8 * 128;
    }
    if constexpr (kQuant) {
      const int end0 = raw.count[0], end1 = end0 + raw.count[1];  // where the runs end in the staged slice
      const int row_chunk = c < end0 ? raw.first[0] + c : c < end1 ? raw.first[1] + c - end0 : raw.first[2] + c - end1;
      chunk_src[k] = c >= raw.chunks ? -1 : 16 * row_chunk;
    } else {
      chunk_src[k] = c < chunks ? 2 * (C == 1 ? 8 * c : global_col(8 * c)) : -1;
    }
  }
  constexpr uintptr_t kLive = 1, kBad = 2;  // tags in the low bits of a 16-byte-aligned row address
  auto issue_copies = [&](int tile, unsigned char* dst) {
    if (tile < n_tiles) {
      // This lane's row of the warp: its address, tagged live (before the
      // split's end) and bad (a block id out of range).
      uintptr_t lane_row;
      {
        const int pos = t_begin + tile * kTileTokens + warp + kWarps * min(lane, kRowsPerWarp - 1);
        const int col = pos / p.block_size;
        const int blk = pos < t_end && col < p.max_blocks ? table[col] : -1;
        const bool live = pos < t_end, bad = live && (blk < 0 || blk >= p.num_blocks);
        const char* row =
            reinterpret_cast<const char*>(cache) +
            (live && !bad ? (static_cast<int64_t>(blk) * p.block_size + (pos - col * p.block_size)) * row_pitch : 0);
        lane_row = reinterpret_cast<uintptr_t>(row) | (live ? kLive : 0) | (bad ? kBad : 0);
      }
      const uint32_t dst_addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int row = warp + kWarps * i;  // row % 8 is (warp + 4 (i % 2)) % 8 with 4 warps, warp % 8 with 8
        const int h = kWarps == 4 ? i % 2 : 0;
        const uintptr_t tagged = __shfl_sync(0xffffffffu, static_cast<unsigned long long>(lane_row), i);
        const char* src = reinterpret_cast<const char*>(tagged & ~uintptr_t{15});
        if (tagged & kBad) {
#pragma unroll
          for (int k = 0; k < kLaneChunks; ++k)
            if (chunk_src[k] >= 0)
              *reinterpret_cast<uint4*>(dst + (kQuant ? 16 * (lane + 32 * k) : chunk_dst[k][h]) + row * row_step) =
                  make_uint4(kNanWord, kNanWord, kNanWord, kNanWord);
        } else {
#pragma unroll
          for (int k = 0; k < kLaneChunks; ++k)
            if (chunk_src[k] >= 0)
              copy16_async_or_zero(dst_addr + (kQuant ? 16 * (lane + 32 * k) : chunk_dst[k][h]) + row * row_step,
                                   src + chunk_src[k], tagged & kLive);
        }
      }
    }
    cp_async_commit();
  };

  // ---- quantized rows: the tile in raw slot `rslot` into the stage, one
  // 16-byte chunk (8 columns of the slice) an item: latent columns as their
  // codes, rope columns as they are, zeros past the slice; the tokens'
  // scales into tile_scale_s. Rows the copies zeroed (past the split's end)
  // come out zero with scale 0, rows of an out-of-range block id with a NaN
  // scale. Whole chunks of codes, and of 8 rope keys on a 4-byte boundary,
  // take a vector path; a chunk across the rope part's end goes element by
  // element. Rows with a scale per group of channels (grouped) take each
  // chunk times its group's scale instead of codes, and a token scale of 1
  // (NaN for a poisoned row). ----
  const bool grouped = kQuant && p.group < p.R;
  auto dequantize = [&](int rslot) {
    const unsigned char* raw_tile = raw_s + rslot * raw_tile_bytes;
    // As the copies: a warp takes rows warp + kWarps i, a lane chunks
    // lane + 32 k of each, so where a chunk comes from and goes to is
    // worked out once a chunk, not once a row.
#pragma unroll
    for (int k = 0; k < kLaneChunks; ++k) {
      const int c = lane + 32 * k, x0 = 8 * c;
      if (c >= chunks) continue;
      const bool code = x0 < p.rc;  // the latent part is whole chunks (host check)
      const bool rope_words = !code && x0 + 8 <= p.rc + p.pc && (raw.rope_at + 2 * (x0 - p.rc)) % 4 == 0;
      const int src_off = code ? raw.code_at + (F == CacheRows::kFp8 ? x0 : x0 / 2) : raw.rope_at + 2 * (x0 - p.rc);
      // where the scale of the chunk's group sits in a raw row (the slice's scales start at its first group's)
      const int scale_off = code ? raw.scale_at + 4 * ((slice * p.rc + x0) / p.group - raw.first_group) : 0;
#pragma unroll 4
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int row = warp + kWarps * i, h = kWarps == 4 ? i % 2 : 0;
        const unsigned char* src = raw_tile + row * p.raw_stride + src_off;
        uint4 v;
        if (code) {
          uint2 w;
          if constexpr (F == CacheRows::kFp8) w = *reinterpret_cast<const uint2*>(src);
          else w = make_uint2(*reinterpret_cast<const uint32_t*>(src), 0u);
          v = dequantize_chunk<T, F>(w);
          if (grouped)
            v = scale_chunk<T>(v, *reinterpret_cast<const float*>(raw_tile + row * p.raw_stride + scale_off));
        } else if (rope_words) {
          const uint32_t* rope = reinterpret_cast<const uint32_t*>(src);
          v = make_uint4(rope[0], rope[1], rope[2], rope[3]);  // 8 rope keys, as stored
        } else {  // the chunk across the rope part's end
          alignas(16) uint16_t e[8];
#pragma unroll
          for (int j = 0; j < 8; ++j)
            e[j] = x0 + j < p.rc + p.pc ? *reinterpret_cast<const uint16_t*>(src + 2 * j) : 0;
          v = *reinterpret_cast<const uint4*>(e);
        }
        *reinterpret_cast<uint4*>(stage_s + chunk_dst[k][h] + row * 128) = v;
      }
    }
    if (tid < kTileTokens) {
      const float token_scale = *reinterpret_cast<const float*>(raw_tile + tid * p.raw_stride + raw.scale_at);
      tile_scale_s[tid] = grouped && token_scale == token_scale ? 1.f : token_scale;
    }
  };

  // ---- the TMA side (the host's box_rows > 0): warp 0 asks the copy
  // engine for tile j's boxes, 64 columns of the slice by box_rows rows each, into
  // stage j % 2, and tile j has landed when that stage's barrier completes
  // its (j / 2)-th phase. Lane i < n_boxes holds where box i of the next
  // tile starts in the cache (looked up one tile ahead, so no lookup
  // latency sits in front of an issue): a row, -1 past the split's end
  // (nothing copied), -2 an out-of-range block id (nothing copied). Rows
  // the copies leave stale are fixed before use (below). ----
  const bool use_tma = p.box_rows > 0;
  const int n_boxes = use_tma ? kTileTokens / p.box_rows : 0, col_blocks = p.dp / 64;
  // Column block cb of this block's slice starts at cache column box_col(cb)
  // (in a cluster the host takes TMA only where rc and pc are whole blocks).
  const int latent_blocks = p.rc / 64;
  auto box_col = [&](int cb) {
    if (C == 1) return 64 * cb;
    return cb < latent_blocks ? slice * p.rc + 64 * cb : p.R + slice * p.pc + 64 * (cb - latent_blocks);
  };
  auto look_up = [&](int tile) {
    const int pos = t_begin + tile * kTileTokens + lane * p.box_rows;
    if (lane >= n_boxes || tile >= n_tiles || pos >= t_end) return -1;
    const int col = pos / p.block_size;
    const int blk = col < p.max_blocks ? table[col] : -1;
    if (blk < 0 || blk >= p.num_blocks) return -2;
    return blk * p.block_size + (pos - col * p.block_size);
  };
  auto issue_tma = [&](int tile, int slot, int box_start) {
    if (warp != 0 || tile >= n_tiles) return;
    const unsigned live = __ballot_sync(0xffffffffu, box_start >= 0);
    const uint32_t bar = landed_addr + 8 * slot;
    const unsigned bad = __ballot_sync(0xffffffffu, box_start == -2);
    if (lane == 0) {
      bad_boxes_s[slot] = bad;
      tma::arrive_expect_tx(bar, __popc(live) * col_blocks * p.box_rows * 128);
    }
    __syncwarp();
    const uint32_t stage = stage_addr + slot * stage_bytes;
    for (int j0 = 0; j0 < n_boxes * col_blocks; j0 += 32) {
      const int j = j0 + lane, box = min(j / col_blocks, n_boxes - 1), cb = j - box * col_blocks;
      const int start = __shfl_sync(0xffffffffu, box_start, box);
      if (j < n_boxes * col_blocks && start >= 0)
        tma::load_2d(stage + cb * (kTileTokens * 128) + box * p.box_rows * 128, &p.cache_map, box_col(cb), start, bar);
    }
  };
  int next_box_start = -1;  // warp 0: box starts of the next tile to issue
  if (use_tma) {
    if (tid == 0) {
      tma::barrier_init(landed_addr, 1);
      tma::barrier_init(landed_addr + 8, 1);
      tma::fence_barrier_init();
    }
    __syncthreads();
    if (warp == 0) {
      issue_tma(0, 0, look_up(0));
      next_box_start = look_up(1);
    }
  } else if constexpr (kQuant) {
    issue_copies(0, raw_s);
    if (p.raw_stages == 2) issue_copies(1, raw_s + raw_tile_bytes);
  } else {
    issue_copies(0, stage_s);
  }

  // ---- q_aug of the block's rows: q_latent, then q_rope in the slot of the
  // row's KV head, zeros elsewhere and in the padding. A thread issues
  // kQBatch 16-byte loads before it stores any (one memory round trip per
  // batch, not per chunk: this sits in front of the first tile); a chunk
  // the vector loads cannot take (unaligned q, rope slots not whole chunks)
  // is gathered element by element after the batch. The padding columns of
  // both stages are zeroed once where the threads copy (their copies never
  // write them; a TMA box covers them, as zeros past the row). ----
  {
    const bool vec_latent = p.R % 8 == 0 && (reinterpret_cast<uintptr_t>(q_latent) & 15) == 0;
    const bool vec_rope = vec_latent && p.rope2 % 8 == 0 && p.pc % 8 == 0 && (reinterpret_cast<uintptr_t>(q_rope) & 15) == 0;
    constexpr int kQBatch = 8;
    // Where query row m's rope keys sit in q_aug: its KV head's slot after the latent.
    auto rope_slot = [&](int m) { return p.R + (m % p.n_h) / (p.n_h / p.n_kv) * p.rope2; };
    for (int i0 = tid; i0 < kRows * chunks_p; i0 += kQBatch * kThreads) {
      uint4 v[kQBatch];
      bool gather[kQBatch];
#pragma unroll
      for (int j = 0; j < kQBatch; ++j) {
        const int i = i0 + j * kThreads, n = i / chunks_p, m = m0 + n, x = 8 * (i % chunks_p);
        v[j] = make_uint4(0, 0, 0, 0);
        gather[j] = false;
        if (i >= kRows * chunks_p || m >= p.M || x >= p.rc + p.pc) continue;
        const int64_t qrow = static_cast<int64_t>(b) * p.M + m;
        const int d = global_col(x);
        if (x < p.rc) {
          if (vec_latent) v[j] = __ldg(reinterpret_cast<const uint4*>(q_latent + qrow * p.R + d));
          else gather[j] = true;
        } else {
          // With whole-chunk rope slots a chunk is all in the row's slot or all outside it.
          const int kr = d - rope_slot(m);
          if (!vec_rope) gather[j] = true;
          else if (kr >= 0 && kr < p.rope2) v[j] = __ldg(reinterpret_cast<const uint4*>(q_rope + qrow * p.rope2 + kr));
        }
      }
#pragma unroll
      for (int j = 0; j < kQBatch; ++j) {
        const int i = i0 + j * kThreads, n = i / chunks_p, c = i % chunks_p, m = m0 + n, x = 8 * c;
        if (i >= kRows * chunks_p) continue;
        if (gather[j]) {
          const int64_t qrow = static_cast<int64_t>(b) * p.M + m;
          const int rope_off = rope_slot(m);
          T e[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const int d = global_col(x + k), kr = d - rope_off;
            e[k] = x + k >= p.rc + p.pc ? from_float<T>(0.f)
                   : d < p.R            ? q_latent[qrow * p.R + d]
                   : (kr >= 0 && kr < p.rope2 ? q_rope[qrow * p.rope2 + kr] : from_float<T>(0.f));
          }
          v[j] = *reinterpret_cast<const uint4*>(e);
        }
        *reinterpret_cast<uint4*>(q_s + wgmma::swizzled_offset(kRows, n, c)) = v[j];
      }
    }
    const int pad = use_tma ? 0 : chunks_p - chunks;
    for (int i = tid; i < kStages * kTileTokens * pad; i += kThreads) {
      const int s = i / (kTileTokens * pad), row = (i / pad) % kTileTokens, c = chunks + i % pad;
      *reinterpret_cast<uint4*>(stage_s + s * stage_bytes + wgmma::swizzled_offset(kTileTokens, row, c)) =
          make_uint4(0, 0, 0, 0);
    }
  }
  if constexpr (kQuant) {  // the first tile, dequantized; q_aug and it are read next by wgmma
    if (p.raw_stages == 2) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    if (n_tiles > 0) dequantize(0);
    wgmma::fence_proxy_async();
    __syncthreads();
  }

  // This thread's 8 query columns of its warpgroup: col(i) = 8 (i / 2) +
  // 2 (lane % 4) + i % 2, the columns of fragment values 4 (i / 2) + i % 2
  // (token row lane / 4) and 4 (i / 2) + 2 + i % 2 (token row + 8).
  auto column = [&](int i) { return 8 * (i / 2) + 2 * (lane % 4) + i % 2; };
  int q_pos[8];  // the last token each column's query may see (causal among new tokens)
#pragma unroll
  for (int i = 0; i < 8; ++i) q_pos[i] = L - p.Q + (m0 + wg * kRowsPerGroup + column(i)) / p.n_h;
  float row_max[8], row_sum[8];  // log2 domain; row_sum: this thread's part
#pragma unroll
  for (int i = 0; i < 8; ++i) row_max[i] = -INFINITY, row_sum[i] = 0.f;
  float acc[8][16];
#pragma unroll
  for (int rb = 0; rb < 8; ++rb)
#pragma unroll
    for (int v = 0; v < 16; ++v) acc[rb][v] = 0.f;
  float* red = red_s + wg * 4 * 32;
  const uint32_t q_group = q_addr + wg * kRowsPerGroup * 128;
  const uint32_t pt_group = pt_addr + wg * kRowsPerGroup * 128;
  // Where this thread's partials and sums land in every block of the cluster.
  const uint32_t scatter_mine = static_cast<uint32_t>(__cvta_generic_to_shared(scatter_s + (slice * kThreads + tid) * kShare));
  const uint32_t gather_mine = static_cast<uint32_t>(__cvta_generic_to_shared(gather_s + (slice * kThreads + tid) * kShare));
  if constexpr (C > 1) cluster::sync();  // every block of the cluster runs before any stores into it

  for (int k = 0, slot = 0; k < n_tiles; ++k, slot ^= 1) {
    // The other stage was released by the barrier ending the last tile.
    if constexpr (kQuant) {
      // The stage holds tile k; the raw slot it came from takes tile k + raw_stages.
      issue_copies(k + p.raw_stages, raw_s + (p.raw_stages == 2 ? slot : 0) * raw_tile_bytes);
    } else if (use_tma) {
      issue_tma(k + 1, slot ^ 1, next_box_start);
      if (warp == 0) next_box_start = look_up(k + 2);
      tma::wait_parity(landed_addr + 8 * slot, (k >> 1) & 1);
      if (k == 0) {
        wgmma::fence_proxy_async();  // q_aug, written by the threads, read next by wgmma
        __syncthreads();
      }
      // The copies write whole boxes: rows past the split's end inside a
      // box hold whatever the cache has there (NaN in unused slots), and
      // boxes not copied hold an older tile. Those rows become zero (their
      // P is 0, and 0 * NaN would poison O); the live rows of a box with an
      // out-of-range block id become NaN.
      const int live_rows = min(kTileTokens, t_end - t_begin - k * kTileTokens);
      const unsigned bad = bad_boxes_s[slot];
      if (live_rows < kTileTokens || bad != 0) {
        for (int i = tid; i < kTileTokens * chunks_p; i += kThreads) {
          const int row = i / chunks_p, c = i % chunks_p;
          const bool dead = row >= live_rows;
          if (dead || (bad >> (row / p.box_rows)) & 1)
            *reinterpret_cast<uint4*>(stage_s + slot * stage_bytes + wgmma::swizzled_offset(kTileTokens, row, c)) =
                dead ? make_uint4(0, 0, 0, 0) : make_uint4(kNanWord, kNanWord, kNanWord, kNanWord);
        }
        wgmma::fence_proxy_async();
        __syncthreads();
      }
    } else {
      issue_copies(k + 1, stage_s + (slot ^ 1) * stage_bytes);
      cp_async_wait<1>();
      wgmma::fence_proxy_async();
      __syncthreads();
    }
    const uint32_t tile = stage_addr + (kQuant ? 0 : slot * stage_bytes);

    // ---- S^T = rows . q_aug^T over the padded row ----
    float s[16];
#pragma unroll
    for (int v = 0; v < 16; ++v) s[v] = 0.f;
    wgmma::fence_operands(s);
    wgmma::fence();
    // This thread's token rows' scales (quantized rows): rows 16 wwarp + lane / 4 and + 8.
    const float scale_lo = kQuant ? tile_scale_s[16 * wwarp + lane / 4] : 1.f;
    const float scale_hi = kQuant ? tile_scale_s[16 * wwarp + lane / 4 + 8] : 1.f;
    {
      // A 64-wide column block at a time: its four 16-wide k steps are 32
      // bytes apart inside the 128-byte rows (descriptor addresses count 16
      // bytes). Over quantized rows the latent blocks come first and their
      // sum is scaled per token before the rope blocks add on.
      uint64_t da = wgmma::sw128_desc(tile, 16, 1024), db = wgmma::sw128_desc(q_group, 16, 1024);
      const int scaled_blocks = kQuant && !grouped ? p.rc / 64 : 0;  // grouped rows are scaled in the tile
      for (int cb = 0; cb < p.dp / 64; ++cb, da += kTileTokens * 128 / 16, db += kRows * 128 / 16) {
        if (cb == scaled_blocks && cb > 0) {
          wgmma::commit();
          wgmma::wait<0>();
          wgmma::fence_operands(s);
#pragma unroll
          for (int v = 0; v < 16; ++v) s[v] *= v % 4 < 2 ? scale_lo : scale_hi;
          wgmma::fence_operands(s);
          wgmma::fence();
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma::mma_m64n32k16<kBf16, 0>(s, da + 2 * kk, db + 2 * kk, cb + kk > 0);
      }
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operands(s);
    if (kQuant && p.rc == p.dp)  // no rope blocks: the latent sum is scaled here
#pragma unroll
      for (int v = 0; v < 16; ++v) s[v] *= v % 4 < 2 ? scale_lo : scale_hi;
    if constexpr (C > 1) {
      // ---- the scores over the whole row: partials of the C slices summed
      // (block c sums values [c kShare, (c+1) kShare) of every thread's
      // fragment, in slice order), then the sums handed to every block ----
#pragma unroll
      for (int peer = 0; peer < C; ++peer) {
        const uint32_t dst = cluster::peer_address(scatter_mine, peer);
#pragma unroll
        for (int v = 0; v < kShare; v += 4)
          cluster::store(dst + 4 * v, s[peer * kShare + v], s[peer * kShare + v + 1], s[peer * kShare + v + 2],
                         s[peer * kShare + v + 3]);
      }
      cluster::sync();
      float sum[kShare];
#pragma unroll
      for (int v = 0; v < kShare; ++v) {
        sum[v] = scatter_s[tid * kShare + v];
#pragma unroll
        for (int src = 1; src < C; ++src) sum[v] += scatter_s[(src * kThreads + tid) * kShare + v];
      }
#pragma unroll
      for (int peer = 0; peer < C; ++peer) {
        const uint32_t dst = cluster::peer_address(gather_mine, peer);
#pragma unroll
        for (int v = 0; v < kShare; v += 4) cluster::store(dst + 4 * v, sum[v], sum[v + 1], sum[v + 2], sum[v + 3]);
      }
      cluster::sync();
#pragma unroll
      for (int v = 0; v < 16; ++v) s[v] = gather_s[((v / kShare) * kThreads + tid) * kShare + v % kShare];
    }

    // ---- mask, scale, the column max over the tile's 64 tokens ----
    const int tok = t_begin + k * kTileTokens + 16 * wwarp + lane / 4;  // and tok + 8
    float tile_max[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int va = 4 * (i / 2) + i % 2, vb = va + 2;
      s[va] = tok < t_end && tok <= q_pos[i] ? s[va] * p.scale_log2 : -INFINITY;
      s[vb] = tok + 8 < t_end && tok + 8 <= q_pos[i] ? s[vb] * p.scale_log2 : -INFINITY;
      float mx = fmaxf(s[va], s[vb]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      tile_max[i] = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    }
    if (lane < 4)
#pragma unroll
      for (int i = 0; i < 8; ++i) red[wwarp * 32 + column(i)] = tile_max[i];
    wgmma::warpgroup_barrier(1 + wg);

    // ---- online softmax per column; P^T to shared memory ----
    float alpha[8];
    bool rescale = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = column(i);
      const float mx = fmaxf(fmaxf(red[c], red[32 + c]), fmaxf(red[64 + c], red[96 + c]));
      const float m_new = fmaxf(row_max[i], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // an all-masked column stays at zero weight
      alpha[i] = exp2f(row_max[i] - m_use);
      rescale |= alpha[i] != 1.f;
      row_max[i] = m_new;
      const int va = 4 * (i / 2) + i % 2, vb = va + 2;
      s[va] = exp2f(s[va] - m_use);
      s[vb] = exp2f(s[vb] - m_use);
      row_sum[i] = row_sum[i] * alpha[i] + s[va] + s[vb];
    }
    // Once the running max settles alpha is 1 for the whole warp: skip the rescale.
    if (__any_sync(0xffffffffu, rescale))
#pragma unroll
      for (int rb = 0; rb < 8; ++rb)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int va = 4 * (i / 2) + i % 2;
          acc[rb][va] *= alpha[i];
          acc[rb][va + 2] *= alpha[i];
        }
    {
      // P^T[column][token]: token rows 16 wwarp + lane / 4 (chunk 2 wwarp)
      // and + 8 (chunk 2 wwarp + 1), element lane / 4 of the chunk. Over
      // quantized rows each token's scale moves onto its P (times
      // kPFactor, taken off the output at the end).
      const float p_scale_lo = kQuant ? scale_lo * kPFactor : 1.f, p_scale_hi = kQuant ? scale_hi * kPFactor : 1.f;
      T* pt = reinterpret_cast<T*>(pt_s);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int n = wg * kRowsPerGroup + column(i), va = 4 * (i / 2) + i % 2;
        const uint32_t row = n * 128 + (lane / 4) * 2;
        pt[(row + (((2 * wwarp) ^ (n & 7)) << 4)) / 2] = from_float<T>(s[va] * p_scale_lo);
        pt[(row + (((2 * wwarp + 1) ^ (n & 7)) << 4)) / 2] = from_float<T>(s[va + 2] * p_scale_hi);
      }
    }
    wgmma::fence_proxy_async();
    wgmma::warpgroup_barrier(1 + wg);

    // ---- O^T += rows^T . P^T, 64 latent columns at a time ----
    const uint64_t da_out = wgmma::sw128_desc(tile, kTileTokens * 128, 1024);
    const uint64_t db_out = wgmma::sw128_desc(pt_group, 16, 1024);
#pragma unroll
    for (int rb = 0; rb < 8; ++rb) wgmma::fence_operands(acc[rb]);
    wgmma::fence();
#pragma unroll
    for (int rb = 0; rb < 8; ++rb)
      if (rb < p.r_blocks)
#pragma unroll
        for (int kk = 0; kk < kTileTokens / 16; ++kk) {
          // A: 64 latent columns (M) x 16 tokens (K), M-major: k steps are 16 rows (2048 bytes) apart.
          wgmma::mma_m64n32k16<kBf16, 1>(acc[rb], da_out + (rb * kTileTokens * 128 + kk * 2048) / 16,
                                         db_out + 2 * kk, 1);
        }
    wgmma::commit();
    wgmma::wait<0>();
#pragma unroll
    for (int rb = 0; rb < 8; ++rb) wgmma::fence_operands(acc[rb]);
    if constexpr (kQuant) {
      // Tile k + 1 into the stage, once its raw copies (every thread's) have
      // landed and every warpgroup is done with tile k.
      if (p.raw_stages == 2) cp_async_wait<1>();
      else cp_async_wait<0>();
      __syncthreads();
      if (k + 1 < n_tiles) dequantize(p.raw_stages == 2 ? slot ^ 1 : 0);
      wgmma::fence_proxy_async();
    }
    __syncthreads();  // this stage is refilled next; red and P^T are rewritten
  }
  // Every tile is read: the split merge (a programmatic dependent launch)
  // may be scheduled once all blocks are here; it still waits for this
  // grid's writes.
  allow_dependent_launch();
  cp_async_wait<0>();

  // ---- finish: column sums over the warpgroup, then the outputs through
  // shared memory: each thread puts its normalized accumulators in
  // o_s[row][x] (the block's query row, a latent column of its slice; rows
  // 64 r_blocks + 4 floats apart, so the 8 columns x 4 rows a warp stores
  // at once fall on 32 banks) over q_aug and the stages, which hold them
  // (4 rows (64 r_blocks + 4) bytes against 2 (rows + 64 stages) dp, with
  // dp >= 64 r_blocks and rows <= 64), and the block then writes whole rows, four
  // columns a thread, in order. Stored straight from the registers, the
  // outputs took thousands of unrolled instructions (8 columns x 8 latent
  // blocks x 2 rows, each with its own address) that run once a block, all
  // fetched cold: at batch 1, with a few tiles a split, most of the call. ----
  float total[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = row_sum[i];
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    total[i] = v + __shfl_xor_sync(0xffffffffu, v, 16);
  }
  if (lane < 4)
#pragma unroll
    for (int i = 0; i < 8; ++i) red[wwarp * 32 + column(i)] = total[i];
  wgmma::warpgroup_barrier(1 + wg);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int c = column(i);
    total[i] = ((red[c] + red[32 + c]) + red[64 + c]) + red[96 + c];  // fixed order: reproducible
  }
  const bool single = p.num_splits == 1;
  const int o_stride = 64 * p.r_blocks + 4;
  float* o_s = reinterpret_cast<float*>(smem);
  __syncthreads();  // q_aug and the stages are free (a split with no tiles has just staged q_aug)
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int n = wg * kRowsPerGroup + column(i), va = 4 * (i / 2) + i % 2;
    const float inv = total[i] > 0.f ? 1.f / (total[i] * kPFactor) : 0.f;
    float* o_row = o_s + n * o_stride + 16 * wwarp + lane / 4;
#pragma unroll
    for (int rb = 0; rb < 8; ++rb)
      if (rb < p.r_blocks) {
        o_row[rb * 64] = acc[rb][va] * inv;
        o_row[rb * 64 + 8] = acc[rb][va + 2] * inv;
      }
    const int m = m0 + n;
    if (m < p.M && slice == 0 && wwarp == 0 && lane < 4) {
      const float v = row_lse(row_max[i], total[i]);
      const int64_t qrow = static_cast<int64_t>(b) * p.M + m;
      if (single) lse[qrow] = v;
      else part_lse[(static_cast<int64_t>(b) * p.num_splits + split) * p.M + m] = v;
    }
  }
  __syncthreads();
  // Row n of the block is output row (b, m0 + n) (of split `split` when
  // partial), columns slice rc + x of R.
  const int rows_here = min(kRows, p.M - m0);
  const int64_t first_row = single ? static_cast<int64_t>(b) * p.M + m0
                                   : (static_cast<int64_t>(b) * p.num_splits + split) * p.M + m0;
  const int64_t col0 = static_cast<int64_t>(slice) * p.rc;
  const bool runs_of_4 = p.R % 4 == 0 && p.rc % 4 == 0 &&
                         (single ? (reinterpret_cast<uintptr_t>(out) & 7) == 0
                                 : (reinterpret_cast<uintptr_t>(part_out) & 15) == 0);
  if (runs_of_4) {
    const int runs = p.rc / 4;
    for (int j = tid; j < rows_here * runs; j += kThreads) {
      const int n = j / runs, x = 4 * (j - n * runs);
      const float4 v = *reinterpret_cast<const float4*>(o_s + n * o_stride + x);
      const int64_t at = (first_row + n) * p.R + col0 + x;
      if (single) {
        alignas(8) T e[4] = {from_float<T>(v.x), from_float<T>(v.y), from_float<T>(v.z), from_float<T>(v.w)};
        *reinterpret_cast<uint2*>(out + at) = *reinterpret_cast<const uint2*>(e);
      } else {
        *reinterpret_cast<float4*>(part_out + at) = v;
      }
    }
  } else {
    for (int j = tid; j < rows_here * p.rc; j += kThreads) {
      const int n = j / p.rc, x = j - n * p.rc;
      const float v = o_s[n * o_stride + x];
      const int64_t at = (first_row + n) * p.R + col0 + x;
      if (single) out[at] = from_float<T>(v);
      else part_out[at] = v;
    }
  }
#endif
}

template <typename T, int NG, int C, CacheRows F>
int prepare(size_t smem) {
  return prepare_decode_kernel<T, Shape>(mla_decode_wgmma_kernel<T, NG, C, F>, 128 * NG, smem);
}

// A launch of `grid` blocks in clusters of C (consecutive in x); `attr`
// holds the cluster size and must outlive the returned config.
template <int NG, int C>
cudaLaunchConfig_t cluster_launch(dim3 grid, size_t smem, cudaStream_t stream, cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(128 * NG);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = C;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return config;
}

// How many clusters of C blocks the GPU runs at once (after prepare(smem)):
// a cluster's blocks share a GPC, so SMs left over in each GPC hold none,
// and blocks per SM times SMs overstates what one wave takes.
template <typename T, int NG, int C, CacheRows F>
int max_clusters(size_t smem) {
  if constexpr (C == 1) {
    return 0;
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = cluster_launch<NG, C>(dim3(C), smem, nullptr, attr);
    int clusters = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, mla_decode_wgmma_kernel<T, NG, C, F>, &config));
    return clusters;
  }
}

// grid.x counts blocks (C per cluster, consecutive).
template <typename T, int NG, int C, CacheRows F>
void launch(const DecodeBuffers& buf, const Shape& s, dim3 grid, size_t smem, cudaStream_t stream) {
  if constexpr (C == 1) {
    launch_decode_kernel<T, Shape>(mla_decode_wgmma_kernel<T, NG, C, F>, grid, 128 * NG, smem, stream, buf, s);
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = cluster_launch<NG, C>(grid, smem, stream, attr);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, mla_decode_wgmma_kernel<T, NG, C, F>, static_cast<const T*>(buf.q_latent),
                                      static_cast<const T*>(buf.q_rope), static_cast<const T*>(buf.cache),
                                      buf.block_table, buf.seq_lens, static_cast<T*>(buf.out), buf.lse,
                                      buf.part_out, buf.part_lse, s));
  }
}

}  // namespace wgmma_decode
}  // namespace mla_cuda

// The wgmma kernel of one dtype, configuration and row format (F: a
// CacheRows value); the instantiation files (instantiations/mla_decode_wgmma_*.cu)
// expand it once per entry of MLA_WGMMA_CONFIGS.
#define MLA_INSTANTIATE_WGMMA_DECODE(T, NG, C, F)                                                  \
  template int mla_cuda::wgmma_decode::prepare<T, NG, C, F>(size_t);                               \
  template int mla_cuda::wgmma_decode::max_clusters<T, NG, C, F>(size_t);                          \
  template void mla_cuda::wgmma_decode::launch<T, NG, C, F>(const mla_cuda::DecodeBuffers&,        \
                                                            const mla_cuda::wgmma_decode::Shape&, \
                                                            dim3, size_t, cudaStream_t);
