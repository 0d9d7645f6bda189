// Tensor-core decode over quantized latent rows (fp8 or int4 codes with one
// float32 scale per token or per group of channels, rope keys in the
// queries' 16-bit dtype): the
// warp-stream kernel of mla_decode_warp.cuh with the latent dequantized in
// registers on its way into the mma fragments. Rows travel from global to
// shared memory as raw bytes (cp.async), are read from there once per
// product, and never exist dequantized in memory.
//
// Per 16-token tile, each warp computes
//   S = (q_lat . codes^T) * scale_t + q_rope . rope^T   (scale_t per token)
//   O += (P * scale_t) . codes                          (P rounded to T)
// so the per-token scale is one multiply on the scores and one on P, and the
// codes enter the mma as exact small values of T (every e4m3 value and every
// int4 code is exact in fp16 and bf16). Rows with a scale per group of
// channels (kGrouped: groups of a multiple of 4 channels) have no per-token
// factor: each B fragment pair enters as its codes times their group's
// scale rounded to T (quant_codes.cuh's scale_pair: the values every
// backend reads, quant_attention_value), and S and P go unscaled.
//
// ldmatrix reads 16-bit elements, so the B fragments are built by hand from
// 8-bit (or 4-bit) codes, and the channel order inside the products is
// permuted to make those loads whole words:
//   - scores: in k step ks, lane l (p = l % 4) takes channels 16 ks + 4p ..
//     4p + 3 of its token (one 32-bit word of fp8, 16 bits of int4) for the
//     k slots {2p, 2p+1} and {2p+8, 2p+9}; its q_aug A fragment is read with
//     the same order, so the dot product is unchanged;
//   - output: the B fragment of output tile j, column n (n = l / 4), is
//     channel chan(j, n) = 32 (j / 4) + 4 n + j % 4 (2 n in a last group of
//     16 channels), so one word of a token row holds the lane's channel of
//     four output tiles; the accumulator is written back in channel order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "../quantized_format.h"
#include "common.cuh"
#include "mla_decode.cuh"
#include "mma_sync.cuh"
#include "online_softmax.cuh"
#include "quant_codes.cuh"

namespace mla_cuda {
namespace quant_decode {

using mma_decode::Mma;

// Sizes of one call; the row layout is that of QuantLayout.
struct Shape {
  int B, Q, n_h, R, rope2, n_kv, rope_total;  // rope_total = n_kv * rope2
  int block_size, max_blocks, num_blocks;
  int M;             // query rows per sequence: Q * n_h
  int row_bytes;     // bytes of a cache row (a multiple of 16)
  int stride_bytes;  // shared-memory row stride: row_bytes, skewed so that
                     // 8 rows x 4 words of an fragment load hit 32 banks
  int scale_offset, rope_offset;  // bytes into a row
  int group;         // channels per scale (R: one scale per token)
  int kl;            // 16-channel k steps of the latent: R / 16
  int kr;            // 16-wide k steps of the rope part: ceil(rope_total / 16)
  int kn;            // 8-wide output tiles: R / 8
  int num_splits;
  float scale_log2;
};

// The channel of output tile j, column n (see the header comment).
__device__ __forceinline__ int out_channel(int j, int n, int R) {
  const int g = j / 4;
  return 32 * g + (32 * g + 32 <= R ? 4 : 2) * n + j % 4;
}

// The score B fragment (b0: k slots 2p, 2p+1; b1: 2p+8, 2p+9) of k step ks
// for the token row `row`: channels 16 ks + 4p .. 4p + 3.
template <typename T, QuantKind K>
__device__ __forceinline__ void score_fragment(const uint8_t* row, int ks, int p, uint32_t& b0, uint32_t& b1) {
  if constexpr (K == QuantKind::kFp8) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(row + 16 * ks + 4 * p);
    b0 = fp8x2_to<T>(w);
    b1 = fp8x2_to<T>(w >> 16);
  } else {
    // four codes (channels 4p .. 4p + 3) in 16 bits; x | x << 12 puts
    // codes 0, 1 at bits 0-3, 16-19 and codes 2, 3 at bits 8-11, 24-27
    const uint32_t x = *reinterpret_cast<const uint16_t*>(row + 8 * ks + 2 * p);
    const uint32_t y = x | (x << 12);
    b0 = int4x2_from_low_nibbles<T>(y);
    b1 = int4x2_from_low_nibbles<T>(y >> 8);
  }
}

// The output B fragments of the tiles 4g .. 4g + 3 of channel group g (or
// 4g, 4g + 1 in a last group of 16 channels), column n: rows holds the
// lane's four token rows (2p, 2p+1, 2p+8, 2p+9). vb[i][0] pairs tokens 2p
// and 2p+1, vb[i][1] tokens 2p+8 and 2p+9, for tile 4g + i.
template <typename T, QuantKind K>
__device__ __forceinline__ void output_fragments(const uint8_t* const (&rows)[4], int g, int n, bool tail,
                                                 uint32_t (&vb)[4][2]) {
  if constexpr (K == QuantKind::kFp8) {
    uint32_t w[4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
      w[t] = tail ? *reinterpret_cast<const uint16_t*>(rows[t] + 32 * g + 2 * n)
                  : *reinterpret_cast<const uint32_t*>(rows[t] + 32 * g + 4 * n);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // token pair h: rows 2h, 2h + 1 of w
      // bytes (w0.i, w1.i, w0.i+1, w1.i+1): tiles i and i + 1
      const uint32_t lo = __byte_perm(w[2 * h], w[2 * h + 1], 0x5140);
      const uint32_t hi = __byte_perm(w[2 * h], w[2 * h + 1], 0x7362);
      vb[0][h] = fp8x2_to<T>(lo);
      vb[1][h] = fp8x2_to<T>(lo >> 16);
      vb[2][h] = fp8x2_to<T>(hi);
      vb[3][h] = fp8x2_to<T>(hi >> 16);
    }
  } else {
    uint32_t x[4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
      x[t] = tail ? static_cast<uint32_t>(rows[t][16 * g + n])
                  : static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(rows[t] + 16 * g + 2 * n));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // the token pair's codes side by side: token 2h in bits 0-15, 2h + 1
      // in bits 16-31, so tile i's pair sits at bits 4i and 16 + 4i
      const uint32_t y = __byte_perm(x[2 * h], x[2 * h + 1], 0x5410);
#pragma unroll
      for (int i = 0; i < 4; ++i) vb[i][h] = int4x2_from_low_nibbles<T>(y >> (4 * i));
    }
  }
}

// NW warps a block, each streaming its own run of 16-token tiles through a
// ring of S stages; KL, KR, KN bound kl, kr, kn, and a lane copies at most
// KC 16-byte chunks of a tile (rows of up to 32 * KC bytes). kGrouped: rows
// with several scales (p.group < p.R).
template <typename T, QuantKind K, bool kGrouped, int NW, int S, int KL, int KR, int KN, int KC>
__global__ void __launch_bounds__(32 * NW, 16 / NW)
mla_decode_quant_kernel(const T* __restrict__ q_latent, const T* __restrict__ q_rope,
                        const uint8_t* __restrict__ cache, const int* __restrict__ block_table,
                        const int* __restrict__ seq_lens, T* __restrict__ out,
                        float* __restrict__ lse, float* __restrict__ part_out,
                        float* __restrict__ part_lse, const Shape p) {
  static_assert(KN % 4 == 0 || KN % 4 == 2, "output tiles come in channel groups of 32 or a last 16");
  static_assert(S >= 2, "a ring of one stage cannot overlap copies and compute");
  constexpr int kTR = 16;  // tokens per tile
  constexpr unsigned kFull = 0xffffffffu;
  constexpr float kPFactor = mla_cuda::kPFactor<T, K == QuantKind::kFp8>;  // P * scale's factor in fp16
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int stage_bytes = kTR * p.stride_bytes;
  uint8_t* ring = smem + warp * S * stage_bytes;

  const int m0 = blockIdx.x * 16, split = blockIdx.y, b = blockIdx.z;
  const int L = seq_lens[b];
  const int split_len = ((L + p.num_splits - 1) / p.num_splits + kTR - 1) / kTR * kTR;
  const int t_begin = min(L, split * split_len);
  const int t_end = min(L, t_begin + split_len);
  const int split_tiles = (t_end - t_begin + kTR - 1) / kTR;
  const int run = (split_tiles + NW - 1) / NW;
  const int first_tile = min(split_tiles, warp * run);
  const int n_tiles = min(split_tiles, first_tile + run) - first_tile;
  const int w_begin = t_begin + first_tile * kTR;
  const int* table = block_table + static_cast<int64_t>(b) * p.max_blocks;
  const int fr = lane / 4, fp = lane % 4;  // fragment row; quad position

  // ---- the copy side, as in the warp-stream kernel: a tile is one
  // contiguous run of 16 rows inside one cache block; lane l copies its
  // 16-byte chunks l, l + 32, ... to destinations computed once ----
  const int chunks = p.row_bytes / 16;
  int dst_off[KC];
#pragma unroll
  for (int j = 0; j < KC; ++j) {
    const int f = lane + 32 * j, row = f / chunks;
    dst_off[j] = row * p.stride_bytes + (f - row * chunks) * 16;
  }
  int next_tile = 0;
  int next_col = w_begin / p.block_size, next_in_block = w_begin - next_col * p.block_size;
  struct TilePlace {
    int blk, in_block;
  };
  auto lookup = [&]() -> TilePlace {
    const TilePlace t{next_tile < n_tiles && next_col < p.max_blocks ? __ldg(table + next_col) : -1,
                      next_in_block};
    ++next_tile;
    next_in_block += kTR;
    if (next_in_block >= p.block_size) { next_in_block -= p.block_size; ++next_col; }
    return t;
  };
  // the ring as a shared-memory address, converted once rather than at
  // every copy
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  auto issue = [&](int slot, int tile, TilePlace place) {
    if (tile < n_tiles) {  // warp-uniform, as are the branches below
      const int t0 = w_begin + tile * kTR;
      const int live = min(kTR, t_end - t0) * chunks;
      const bool known = place.blk >= 0 && place.blk < p.num_blocks;
      const uint8_t* src = cache + (known ? (static_cast<int64_t>(place.blk) * p.block_size + place.in_block) *
                                                static_cast<int64_t>(p.row_bytes) : 0);
      const uint32_t dst_s = ring_s + slot * stage_bytes;
      if (known) {  // rows of a real block; rows past the sequence's end read as zeros
#pragma unroll
        for (int j = 0; j < KC; ++j) {
          const int f = lane + 32 * j;
          if (f < kTR * chunks) copy16_async_or_zero(dst_s + dst_off[j], src + f * 16, f < live);
        }
      } else {  // a block out of range: its rows NaN, rows past the end zeros
        uint8_t* dst = ring + slot * stage_bytes;
        const uint4 nan4 = make_uint4(kNanWord, kNanWord, kNanWord, kNanWord);  // NaN scales and rope keys
#pragma unroll
        for (int j = 0; j < KC; ++j) {
          const int f = lane + 32 * j;
          if (f < kTR * chunks) {
            if (f >= live) copy16_async_or_zero(dst_s + dst_off[j], src + f * 16, false);
            else *reinterpret_cast<uint4*>(dst + dst_off[j]) = nan4;
          }
        }
      }
    }
    cp_async_commit();
  };
  {
    TilePlace first[S - 1];
#pragma unroll
    for (int s = 0; s < S - 1; ++s) first[s] = lookup();
#pragma unroll
    for (int s = 0; s < S - 1; ++s) issue(s, s, first[s]);
  }
  TilePlace ahead = lookup();

  // ---- q as A fragments, from global memory: the latent part in the
  // permuted channel order (channels 16 i + 4 fp + 2 (e / 2), + 1), the
  // rope part in plain order at the row's KV-head slot ----
  uint32_t ql[KL][4], qr[KR][4];
  {
    const mma_decode::QueryRows<2> rows(p, b, m0 + fr, 0);
    auto rope_elem = [&](int r, int k) -> float {
      const int kk = k - rows.rope_off[r];
      return kk >= 0 && kk < p.rope2 ? to_float(q_rope[rows.q_row[r] * p.rope2 + kk]) : 0.f;
    };
#pragma unroll
    for (int i = 0; i < KL; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e % 2, col = i * 16 + 4 * fp + 2 * (e / 2);
        ql[i][e] = i < p.kl && rows.live[r]
                       ? __ldg(reinterpret_cast<const unsigned int*>(q_latent + rows.q_row[r] * p.R + col)) : 0u;
      }
#pragma unroll
    for (int i = 0; i < KR; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e % 2, k = i * 16 + 2 * fp + 8 * (e / 2);
        qr[i][e] = i < p.kr && rows.live[r] ? Mma<T>::pack(rope_elem(r, k), rope_elem(r, k + 1)) : 0u;
      }
  }

  // Grouped rows: where in a row the scale of this lane's channels sits,
  // for each score k step (channels 16 i + 4 fp ..) and each output
  // channel group (the channels out_channel(4 g + i, fr), i < 4: one group,
  // as groups are whole runs of 4).
  int score_scale[KL], out_scale[(KN + 3) / 4];
  if constexpr (kGrouped) {
#pragma unroll
    for (int i = 0; i < KL; ++i) score_scale[i] = p.scale_offset + 4 * ((16 * i + 4 * fp) / p.group);
#pragma unroll
    for (int g = 0; g < (KN + 3) / 4; ++g)
      out_scale[g] = p.scale_offset + 4 * (min(out_channel(4 * g, fr, p.R), p.R - 1) / p.group);
  }

  float acc[KN][4];
#pragma unroll
  for (int j = 0; j < KN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  int q_pos[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) q_pos[r] = L - p.Q + (m0 + fr + 8 * r) / p.n_h;

  for (int k = 0; k < n_tiles; ++k) {
    issue((k + S - 1) % S, k + S - 1, ahead);
    ahead = lookup();
    cp_async_wait<S - 1>();
    __syncwarp();
    const uint8_t* tile = ring + (k % S) * stage_bytes;

    // ---- scores of this lane's token (fr, and fr + 8 for the second n8
    // tile): latent and rope apart, the latent scaled per token ----
    float sl[2][4], sr[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sl[j][e] = sr[j][e] = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint8_t* row = tile + (8 * j + fr) * p.stride_bytes;
#pragma unroll
      for (int i = 0; i < KL; ++i)
        if (i < p.kl) {
          uint32_t b0, b1;
          score_fragment<T, K>(row, i, fp, b0, b1);
          if constexpr (kGrouped) {
            const float gs = *reinterpret_cast<const float*>(row + score_scale[i]);
            b0 = scale_pair<T>(b0, gs, gs);
            b1 = scale_pair<T>(b1, gs, gs);
          }
          Mma<T>::mma(sl[j], ql[i], b0, b1);
        }
      const uint8_t* rope = row + p.rope_offset;
#pragma unroll
      for (int i = 0; i < KR; ++i)
        if (i < p.kr) {
          const int k0 = 16 * i + 2 * fp;  // rope elements k0, k0 + 1 and k0 + 8, k0 + 9
          const uint32_t b0 = k0 < p.rope_total ? *reinterpret_cast<const uint32_t*>(rope + 2 * k0) : 0u;
          const uint32_t b1 = k0 + 8 < p.rope_total ? *reinterpret_cast<const uint32_t*>(rope + 2 * (k0 + 8)) : 0u;
          Mma<T>::mma(sr[j], qr[i], b0, b1);
        }
    }
    // the per-token scales of this lane's score columns: tokens 8 j + 2 fp + c
    // (grouped rows: 1, their values carry their scales)
    float sc[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        sc[j][c] = kGrouped ? 1.f
                            : *reinterpret_cast<const float*>(tile + (8 * j + 2 * fp + c) * p.stride_bytes +
                                                              p.scale_offset);

    const int t0 = w_begin + k * kTR;
    float s[2][4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v[4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * r + c, tok = t0 + 8 * j + 2 * fp + c;
          const float score = sl[j][e] * sc[j][c] + sr[j][e];
          v[2 * j + c] = (tok < t_end && tok <= q_pos[r]) ? score * p.scale_log2 : -INFINITY;
        }
      const float alpha = softmax_row_step(v, row_max[r], row_sum[r]);
      // P * scale_t: the scale of each token's codes moves onto its weight
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) s[j][2 * r + c] = v[2 * j + c] * (sc[j][c] * kPFactor);
      rescale_row(acc, r, alpha);
    }

    // ---- O += (P * scale) . codes: A from the score fragments (C layout
    // = A layout), B built per channel group from the lane's four token
    // rows ----
    const uint32_t pa[4] = {Mma<T>::pack(s[0][0], s[0][1]), Mma<T>::pack(s[0][2], s[0][3]),
                            Mma<T>::pack(s[1][0], s[1][1]), Mma<T>::pack(s[1][2], s[1][3])};
    const uint8_t* const vrows[4] = {tile + (2 * fp) * p.stride_bytes, tile + (2 * fp + 1) * p.stride_bytes,
                                     tile + (2 * fp + 8) * p.stride_bytes, tile + (2 * fp + 9) * p.stride_bytes};
#pragma unroll
    for (int g = 0; g < (KN + 3) / 4; ++g)
      if (4 * g < p.kn) {
        const bool tail = 4 * g + 2 >= p.kn;  // a last group of 16 channels: two tiles
        uint32_t vb[4][2];
        output_fragments<T, K>(vrows, g, fr, tail, vb);
        if constexpr (kGrouped) {  // vb[i][h] pairs tokens vrows[2 h] and vrows[2 h + 1]
          float ts[4];
#pragma unroll
          for (int t = 0; t < 4; ++t) ts[t] = *reinterpret_cast<const float*>(vrows[t] + out_scale[g]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) vb[i][h] = scale_pair<T>(vb[i][h], ts[2 * h], ts[2 * h + 1]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (4 * g + i < KN && (i < 2 || !tail)) Mma<T>::mma(acc[4 * g + i], pa, vb[i][0], vb[i][1]);
      }
    __syncwarp();
  }
  cp_async_wait<0>();

  // ---- merge the warps (as the warp-stream kernel), channels in order ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(kFull, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(kFull, row_sum[r], 2);
  }
  __syncthreads();
  float* stats_s = reinterpret_cast<float*>(smem);  // [NW][16][2]
  float* final_s = stats_s + NW * 16 * 2;          // [16][2]
  float* slab_s = final_s + 16 * 2;                // [NW][16][R]
  if (fp == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      stats_s[(warp * 16 + fr + 8 * r) * 2] = row_max[r];
      stats_s[(warp * 16 + fr + 8 * r) * 2 + 1] = row_sum[r];
    }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int m = fr + 8 * r;
    float mx, m_use, total;
    merge_row_stats(stats_s + m * 2, 16 * 2, NW, mx, m_use, total);
    const float f = exp2f(row_max[r] - m_use) / kPFactor;
    if (warp == 0 && fp == 0) {
      final_s[m * 2] = mx;
      final_s[m * 2 + 1] = total;
    }
#pragma unroll
    for (int j = 0; j < KN; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (j < p.kn) slab_s[(warp * 16 + m) * p.R + out_channel(j, 2 * fp + e, p.R)] = acc[j][2 * r + e] * f;
  }
  __syncthreads();

  write_rows_from_slabs<NW>(slab_s, final_s, p, m0, b, split, out, lse, part_out, part_lse, warp, lane, tid);
}

}  // namespace quant_decode
}  // namespace mla_cuda
