// Tensor-core decode kernel for narrow latents (SmolLM2-size rows: D <= 16*KQ,
// R <= 8*KN), where the speed is set by how many cache bytes are in flight,
// not by arithmetic: a 240-byte row carries a few hundred FLOP per head.
//
// Same contract, products and output layout as the cooperative kernel of
// mla_decode_mma.cuh (which stays the path for wide latents: its warps share
// one token group so that a 16 x 2048 accumulator fits). Here every warp is
// a whole decoder of its own:
//   - it holds the q_aug tile (16 query rows x D) as mma A fragments and the
//     full 16 x R float32 accumulator in registers;
//   - it streams its own run of the split's tokens through its own ring of S
//     shared-memory stages of 16 rows (cp.async: S - 1 tiles in flight while
//     it computes one), with no block barrier in the loop, so a warp waiting
//     on memory never holds up another;
//   - a tile of 16 tokens lies in one cache block (the kernel takes block
//     sizes that are multiples of 16): one table lookup, loaded one tile
//     ahead of its copy,
//     then 16-byte copies of one contiguous run whose shared-memory
//     destinations are computed once;
//   - it keeps its own running max and sum.
// The warps of a block take consecutive runs of whole tiles and are merged
// once at the end, in warp order (reproducible bitwise); splits of a
// sequence go to other blocks and are merged by the combine kernel.
#pragma once

#include "common.cuh"
#include "mla_decode.cuh"
#include "mma_sync.cuh"
#include "online_softmax.cuh"

namespace mla_cuda {
namespace warp_decode {

using mma_decode::ldmatrix_x4;
using mma_decode::load_q_fragments;
using mma_decode::Mma;

constexpr int kSubRows = 16;  // tokens per sub-tile: one k step of P . V

// Configurations with at most 8 k steps ask the compiler for 16 warps per SM
// (128 registers a thread; 12 warps with two sub-tiles, whose scores take
// more): more warps hide more of the latency of each warp's dependent chain
// of loads, mma and shuffles. Wider ones would spill.

template <typename T, int NW, int S, int NT, int KQ, int KN>
__global__ void __launch_bounds__(32 * NW, KQ <= 8 ? (NT == 1 ? 16 : 12) / NW : 1)
mla_decode_warp_kernel(const T* __restrict__ q_latent, const T* __restrict__ q_rope,
                       const T* __restrict__ cache, const int* __restrict__ block_table,
                       const int* __restrict__ seq_lens, T* __restrict__ out,
                       float* __restrict__ lse, float* __restrict__ part_out,
                       float* __restrict__ part_lse, const Shape p) {
  static_assert(KN % 2 == 0, "output tiles are loaded in pairs");
  static_assert(S >= 2, "a ring of one stage cannot overlap copies and compute");
  constexpr int kTR = kSubRows * NT;  // tokens per tile
  constexpr unsigned kFull = 0xffffffffu;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int stage_elems = kTR * p.row_stride;
  T* ring = reinterpret_cast<T*>(smem) + warp * S * stage_elems;

  const int m0 = blockIdx.x * 16, split = blockIdx.y, b = blockIdx.z;
  const int L = seq_lens[b];
  // Splits of whole tiles, sized from this sequence's own length; the warps
  // of the block then take consecutive runs of the split's tiles.
  const int split_len = ((L + p.num_splits - 1) / p.num_splits + kTR - 1) / kTR * kTR;
  const int t_begin = min(L, split * split_len);
  const int t_end = min(L, t_begin + split_len);
  const int split_tiles = (t_end - t_begin + kTR - 1) / kTR;
  const int run = (split_tiles + NW - 1) / NW;
  const int first_tile = min(split_tiles, warp * run);
  const int n_tiles = min(split_tiles, first_tile + run) - first_tile;
  const int w_begin = t_begin + first_tile * kTR;
  const int* table = block_table + static_cast<int64_t>(b) * p.max_blocks;
  const int fr = lane / 4, fc = 2 * (lane % 4);  // fragment row, first column

  // ---- the copy side ----
  // A tile is 16 consecutive tokens starting on a multiple of 16, and the
  // block size is a multiple of 16 (the host checks), so a tile lies in one
  // cache block: its rows are one contiguous run of 16 * D values, found by
  // one table lookup, and lane l copies 16-byte chunks l, l + 32, ... of it.
  // Their shared-memory destinations are the same for every tile, so they
  // are computed once, here.
  const int chunks = p.D / 8;  // 16-byte chunks per row: at most 2 * KQ
  const int sub_chunks = kSubRows * chunks;
  int dst_off[KQ];  // lane + 32 j (j < KQ) covers one sub-tile: 16 rows of up to 2 * KQ chunks
#pragma unroll
  for (int j = 0; j < KQ; ++j) {
    const int f = lane + 32 * j, row = f / chunks;
    dst_off[j] = row * p.row_stride + (f - row * chunks) * 8;
  }
  // The block id of the next tile to look up. Tiles are
  // looked up in order, so the column of the block table and the tile's
  // offset inside its block advance without a division per tile.
  int next_tile = 0;
  int next_col = w_begin / p.block_size, next_in_block = w_begin - next_col * p.block_size;
  struct TilePlace {
    int blk;       // block id (-1: no lookup)
    int in_block;  // first token's index inside its block
  };
  auto lookup = [&]() -> TilePlace {
    const TilePlace t{next_tile < n_tiles && next_col < p.max_blocks ? __ldg(table + next_col) : -1,
                      next_in_block};
    ++next_tile;
    next_in_block += kTR;
    if (next_in_block >= p.block_size) { next_in_block -= p.block_size; ++next_col; }
    return t;
  };
  // The ring as a shared-memory address, converted once rather than at
  // every copy.
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  // Rows of `tile` into ring slot `slot`, given its looked-up place: rows
  // past the split's end are zero-filled (their scores are masked, and 0
  // times a stale NaN would poison P . V); an out-of-range block id
  // (rejected by the wrapper when it validates) reads as NaN, never out of
  // bounds. Always commits one group, so the wait below counts tiles.
  auto issue = [&](int slot, int tile, TilePlace place) {
    if (tile < n_tiles) {  // warp-uniform, as is `known`
      const int t0 = w_begin + tile * kTR;
      const int live = min(kTR, t_end - t0) * chunks;  // chunks of real rows
      const bool known = place.blk >= 0 && place.blk < p.num_blocks;
      const T* src = cache + (known ? (static_cast<int64_t>(place.blk) * p.block_size + place.in_block) * p.D : 0);
      const uint32_t dst_s = ring_s + slot * stage_elems * static_cast<int>(sizeof(T));
      if (known) {  // one predicated cp.async a chunk
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int j = 0; j < KQ; ++j) {
            const int f_sub = lane + 32 * j, f = n * sub_chunks + f_sub;
            if (f_sub < sub_chunks)
              copy16_async_or_zero(dst_s + (n * kSubRows * p.row_stride + dst_off[j]) * static_cast<int>(sizeof(T)),
                                   src + f * 8, f < live);
          }
      } else {
        T* dst = ring + slot * stage_elems;
        const uint4 nan4 = make_uint4(kNanWord, kNanWord, kNanWord, kNanWord);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int j = 0; j < KQ; ++j) {
            const int f_sub = lane + 32 * j, f = n * sub_chunks + f_sub;
            T* d = dst + n * kSubRows * p.row_stride + dst_off[j];
            if (f_sub < sub_chunks) {
              if (f >= live) copy16_async_or_zero(d, src + f * 8, false);
              else *reinterpret_cast<uint4*>(d) = nan4;
            }
          }
      }
    }
    cp_async_commit();
  };

  // Padding columns [D, 16 * k_steps) of every stage take part in the score
  // product against zero queries: zero, never stale NaN (the copies never
  // write them). D is a whole number of 16-byte chunks, so the padding is
  // none or one chunk per row.
  if (p.k_steps * 16 > p.D)
    for (int row = lane; row < S * kTR; row += 32)
      *reinterpret_cast<uint4*>(ring + row * p.row_stride + p.D) = make_uint4(0, 0, 0, 0);

  // Start the ring before anything else waits on memory: the lookups of the
  // first S - 1 tiles are in flight together, then their copies.
  {
    TilePlace first[S - 1];
#pragma unroll
    for (int s = 0; s < S - 1; ++s) first[s] = lookup();
#pragma unroll
    for (int s = 0; s < S - 1; ++s) issue(s, s, first[s]);
  }
  TilePlace ahead = lookup();

  // ---- q_aug as A fragments, straight from global memory (its latency
  // overlaps the first copies) ----
  uint32_t qf[KQ][4];
  load_q_fragments<T, KQ>(qf, q_latent, q_rope, p, b, m0, 0, p.kq, lane);

  float acc[KN][4];
#pragma unroll
  for (int j = 0; j < KN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, rows fr and fr + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's part; quad-summed at the end
  int q_pos[2];  // query token of each fragment row (rows past M are padding)
#pragma unroll
  for (int r = 0; r < 2; ++r) q_pos[r] = L - p.Q + (m0 + fr + 8 * r) / p.n_h;
  __syncwarp();  // the zeroed padding columns are visible to the whole warp

  for (int k = 0; k < n_tiles; ++k) {
    issue((k + S - 1) % S, k + S - 1, ahead);
    ahead = lookup();
    cp_async_wait<S - 1>();  // tile k has landed (this lane's copies)
    __syncwarp();            // ... and every lane's
    const T* rows = ring + (k % S) * stage_elems;

    // ---- scores: per sub-tile, two n8 tiles of tokens over all of D. With
    // one sub-tile, even and odd k steps accumulate apart, so the chain of
    // dependent mma is never longer than KQ / 2 ----
    constexpr int kChains = NT == 1 ? 2 : 1;
    float s[NT][2][4];
    {
      float part[kChains][NT][2][4];
#pragma unroll
      for (int c = 0; c < kChains; ++c)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[c][n][j][e] = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const T* base = rows + (n * kSubRows + (lane / 16) * 8 + lane % 8) * p.row_stride + ((lane / 8) % 2) * 8;
#pragma unroll
        for (int i = 0; i < KQ; ++i)
          if (i < p.kq) {
            uint32_t kb[4];
            ldmatrix_x4<false>(kb, base + i * 16);
            Mma<T>::mma(part[i % kChains][n][0], qf[i], kb[0], kb[1]);
            Mma<T>::mma(part[i % kChains][n][1], qf[i], kb[2], kb[3]);
          }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][j][e] = kChains == 2 ? part[0][n][j][e] + part[kChains - 1][n][j][e] : part[0][n][j][e];
    }

    // ---- mask, scale, online softmax (each lane: 2 rows x 4 tokens per
    // sub-tile): tokens past the split, and past a query's own position
    // when several query tokens share the step, score -inf ----
    const int t0 = w_begin + k * kTR;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v[NT * 4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tok = t0 + n * kSubRows + 8 * j + fc + e;
            v[(n * 2 + j) * 2 + e] = (tok < t_end && tok <= q_pos[r]) ? s[n][j][2 * r + e] * p.scale_log2 : -INFINITY;
          }
      const float alpha = softmax_row_step(v, row_max[r], row_sum[r]);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) s[n][j][2 * r + e] = v[(n * 2 + j) * 2 + e];
      rescale_row(acc, r, alpha);
    }

    // ---- O += P . rows[:, 0:R], one k step per sub-tile (P's C layout is
    // the A layout) ----
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const uint32_t pa[4] = {Mma<T>::pack(s[n][0][0], s[n][0][1]), Mma<T>::pack(s[n][0][2], s[n][0][3]),
                              Mma<T>::pack(s[n][1][0], s[n][1][1]), Mma<T>::pack(s[n][1][2], s[n][1][3])};
      const T* base = rows + (n * kSubRows + ((lane / 8) % 2) * 8 + lane % 8) * p.row_stride + (lane / 16) * 8;
#pragma unroll
      for (int j = 0; j < KN; j += 2)
        if (j < p.kn) {
          uint32_t vb[4];
          ldmatrix_x4<true>(vb, base + j * 8);
          Mma<T>::mma(acc[j], pa, vb[0], vb[1]);
          Mma<T>::mma(acc[j + 1], pa, vb[2], vb[3]);
        }
    }
    __syncwarp();  // the slot is refilled by the next iteration's copies
  }
  cp_async_wait<0>();  // no copy may land in a ring that is reused below

  // ---- merge the warps: common max per row, then the scaled accumulators
  // summed in warp order ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(kFull, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(kFull, row_sum[r], 2);
  }
  __syncthreads();  // every warp is done with its ring: the merge reuses them
  float* stats_s = reinterpret_cast<float*>(smem);  // [NW][16][2]: max, sum
  float* final_s = stats_s + NW * 16 * 2;          // [16][2]: max, sum
  float* slab_s = final_s + 16 * 2;                // [NW][16][R]
  if (lane % 4 == 0)
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
    const float f = exp2f(row_max[r] - m_use);
    if (warp == 0 && lane % 4 == 0) {
      final_s[m * 2] = mx;
      final_s[m * 2 + 1] = total;
    }
#pragma unroll
    for (int j = 0; j < KN; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = j * 8 + fc + e;
        if (j < p.kn && c < p.R) slab_s[(warp * 16 + m) * p.R + c] = acc[j][2 * r + e] * f;
      }
  }
  __syncthreads();

  write_rows_from_slabs<NW>(slab_s, final_s, p, m0, b, split, out, lse, part_out, part_lse, warp, lane, tid);
}

template <typename T, int NW, int S, int NT, int KQ, int KN>
int prepare(size_t smem) {
  return prepare_decode_kernel<T, Shape>(mla_decode_warp_kernel<T, NW, S, NT, KQ, KN>, 32 * NW, smem);
}

template <typename T, int NW, int S, int NT, int KQ, int KN>
void launch(const DecodeBuffers& buf, const Shape& s, dim3 grid, size_t smem, cudaStream_t stream) {
  launch_decode_kernel<T, Shape>(mla_decode_warp_kernel<T, NW, S, NT, KQ, KN>, grid, 32 * NW, smem,
                                 stream, buf, s);
}

}  // namespace warp_decode
}  // namespace mla_cuda

// The warp-stream kernel of one dtype and configuration; the instantiation
// files (instantiations/mla_decode_warp_*.cu) expand it once per entry of
// MLA_WARP_CONFIGS.
#define MLA_INSTANTIATE_WARP_DECODE(T, NW, S, NT, KQ, KN)                                 \
  template int mla_cuda::warp_decode::prepare<T, NW, S, NT, KQ, KN>(size_t);              \
  template void mla_cuda::warp_decode::launch<T, NW, S, NT, KQ, KN>(                      \
      const mla_cuda::DecodeBuffers&, const mla_cuda::warp_decode::Shape&, dim3, size_t,  \
      cudaStream_t);
