// Tensor-core decode kernel for 16-bit caches (mma.sync m16n8k16, sm_80+).
//
// Same contract and output layout as the FMA kernel of mla_decode_fma.cuh,
// which stays the path for float32, rows that are not whole 16-byte chunks, and
// GPUs older than sm_80. Both products run on the tensor cores:
//   S[16 x 16]  = q_aug[16 x D] . rows[16 x D]^T   (q_aug: latent + rope slot)
//   O[16 x R] += P[16 x 16] . rows[16 x R]
// A block takes one tile of 16 query rows (the Q*n_h (token, head) pairs of a
// sequence, padded to 16) and one split of the sequence. Its warps form a
// WT x WC grid:
//   - WC warps share one group of 16 tokens. Warp wc holds the q_aug fragments
//     of its slice of D in registers and computes a partial S over it; the WC
//     partials are summed through shared memory in a fixed order (every warp
//     of the group gets the same S, bitwise), so each warp runs the same
//     online softmax and multiplies P into its own slice of the R output
//     columns. This is how a 2048-wide latent fits: the 16 x 2048 float
//     accumulator is spread over the WC (8) warps.
//   - WT groups take different tokens of a tile (16 each) and keep their own
//     running max and sum; they are merged once at the end, in a fixed order.
// Rows are staged in shared memory by cp.async, two tiles in flight. Each
// warp's q_aug A fragments come straight from global memory (every load in
// flight at once, behind the first tile's copies): a short split, as at
// batch 1, is not held up by staging q. P is rounded to the cache's 16-bit
// type for the second product (as FlashAttention does); scores, the softmax
// state and the accumulators stay float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "mla_decode.cuh"
#include "mma_sync.cuh"
#include "online_softmax.cuh"

namespace mla_cuda {
namespace mma_decode {

template <typename T, int WC, int WT, int KQ, int KN>
__global__ void __launch_bounds__(32 * WC * WT)
mla_decode_mma_kernel(const T* __restrict__ q_latent, const T* __restrict__ q_rope,
                      const T* __restrict__ cache, const int* __restrict__ block_table,
                      const int* __restrict__ seq_lens, T* __restrict__ out,
                      float* __restrict__ lse, float* __restrict__ part_out,
                      float* __restrict__ part_lse, const Shape p) {
  static_assert(KN % 2 == 0, "output tiles are loaded in pairs");
  constexpr int kThreads = 32 * WC * WT;
  constexpr int kTile = 16 * WT;  // tokens per staged tile
  extern __shared__ __align__(16) unsigned char smem[];
  T* stage_s = reinterpret_cast<T*>(smem);  // [2][kTile][row_stride]
  const int stage_elems = kTile * p.row_stride;
  float* sred_s = reinterpret_cast<float*>(stage_s + 2 * stage_elems);  // [WT][WC][32][8]
  float* stats_s = sred_s + (WC > 1 ? WT * WC * 32 * 8 : 0);            // [WT][16][2]: max, sum
  float* merged_s = reinterpret_cast<float*>(stage_s);  // [16][R], reuses the stages at the end

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wc = warp % WC, wt = warp / WC;
  const int m0 = blockIdx.x * 16, split = blockIdx.y, b = blockIdx.z;
  const int L = seq_lens[b];
  // Splits of whole tiles, sized from this sequence's own length.
  const int split_len = ((L + p.num_splits - 1) / p.num_splits + kTile - 1) / kTile * kTile;
  const int t_begin = min(L, split * split_len);
  const int t_end = min(L, t_begin + split_len);
  const int n_tiles = (t_end - t_begin + kTile - 1) / kTile;
  const int fr = lane / 4, fc = 2 * (lane % 4);  // fragment row, first column
  const int* table = block_table + static_cast<int64_t>(b) * p.max_blocks;
  const int chunks = p.D / 8;  // 16-byte chunks per row

  // Padding columns [D, 16 * k_steps) of every staged row take part in the
  // score product against zero queries: make them zero, not stale NaN (the
  // copies never write them).
  const int pad = p.k_steps * 16 - p.D;
  for (int i = tid; i < 2 * kTile * pad; i += kThreads)
    stage_s[(i / pad) * p.row_stride + p.D + i % pad] = from_float<T>(0.f);
  __syncthreads();  // the padding is zero before the first copy

  // ---- the copy side: tile j goes to stage j % 2 ----
  // Each row is loaded by kThreads / kTile adjacent threads (one block-table
  // lookup each, then 16-byte cp.async chunks). Rows past the split's end
  // are zeroed (their scores are masked, and 0 * stale NaN would poison
  // P.V); an out-of-range block id (rejected by the wrapper when it
  // validates) reads as NaN, never out of bounds. One group is committed per
  // tile, issued or not, so the wait below counts tiles.
  constexpr int kRowThreads = kThreads / kTile;
  const int load_row = tid / kRowThreads, load_lane = tid % kRowThreads;
  auto issue = [&](int tile, int slot) {
    if (tile < n_tiles) {
      uint4* dst = reinterpret_cast<uint4*>(stage_s + slot * stage_elems + load_row * p.row_stride);
      const int pos = t_begin + tile * kTile + load_row;
      const int col = pos / p.block_size;
      const int blk = pos < t_end && col < p.max_blocks ? table[col] : -1;
      if (pos >= t_end || blk < 0 || blk >= p.num_blocks) {
        const uint4 fill = pos >= t_end ? make_uint4(0, 0, 0, 0)
                                        : make_uint4(kNanWord, kNanWord, kNanWord, kNanWord);
        for (int c = load_lane; c < chunks; c += kRowThreads) dst[c] = fill;
      } else {
        const uint4* src = reinterpret_cast<const uint4*>(
            cache + (static_cast<int64_t>(blk) * p.block_size + pos - col * p.block_size) * p.D);
        for (int c = load_lane; c < chunks; c += kRowThreads) copy16_async(dst + c, src + c);
      }
    }
    cp_async_commit();
  };

  // The first tile goes out before anything waits on memory, then the queries.
  issue(0, 0);

  // ---- this warp's slice of q_aug as mma A fragments (k steps wc * kq ...) ----
  uint32_t qf[KQ][4];
  load_q_fragments<T, KQ>(qf, q_latent, q_rope, p, b, m0, wc * p.kq, min(p.kq, p.k_steps - wc * p.kq), lane);

  float acc[KN][4];
#pragma unroll
  for (int j = 0; j < KN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, rows fr and fr + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's part; quad-summed at the end
  // Query token of each fragment row (rows past M are padding: no mask).
  int q_pos[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) q_pos[r] = L - p.Q + (m0 + fr + 8 * r) / p.n_h;

  for (int k = 0, slot = 0; k < n_tiles; ++k, slot ^= 1) {
    // The other stage (tile k - 1) was released by the barrier that ended
    // the last iteration: tile k + 1 goes there.
    issue(k + 1, slot ^ 1);
    cp_async_wait<1>();
    __syncthreads();
    const int t0 = t_begin + k * kTile;
    const T* rows = stage_s + slot * stage_elems + wt * 16 * p.row_stride;

    // ---- partial scores over this warp's k steps: two n8 tiles of tokens,
    // even and odd k steps accumulated apart (half the chain of dependent
    // mma), then added ----
    float s[2][4];
    {
      float part[2][2][4] = {};
      const T* base = rows + ((lane / 16) * 8 + lane % 8) * p.row_stride + ((lane / 8) % 2) * 8;
#pragma unroll
      for (int i = 0; i < KQ; ++i) {
        const int ks = wc * p.kq + i;
        if (i < p.kq && ks < p.k_steps) {
          uint32_t kb[4];
          ldmatrix_x4<false>(kb, base + ks * 16);
          Mma<T>::mma(part[i % 2][0], qf[i], kb[0], kb[1]);
          Mma<T>::mma(part[i % 2][1], qf[i], kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = part[0][j][e] + part[1][j][e];
    }
    if constexpr (WC > 1) {  // sum the WC partials in a fixed order
      float4* mine = reinterpret_cast<float4*>(sred_s + ((wt * WC + wc) * 32 + lane) * 8);
      mine[0] = make_float4(s[0][0], s[0][1], s[0][2], s[0][3]);
      mine[1] = make_float4(s[1][0], s[1][1], s[1][2], s[1][3]);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      for (int w = 0; w < WC; ++w) {
        const float4* other = reinterpret_cast<const float4*>(sred_s + ((wt * WC + w) * 32 + lane) * 8);
        const float4 a = other[0], c = other[1];
        s[0][0] += a.x; s[0][1] += a.y; s[0][2] += a.z; s[0][3] += a.w;
        s[1][0] += c.x; s[1][1] += c.y; s[1][2] += c.z; s[1][3] += c.w;
      }
    }

    // ---- mask, scale, online softmax (each lane: 2 rows x 4 tokens) ----
    const int tok0 = t0 + wt * 16 + fc;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v[4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = tok0 + 8 * j + e;
          v[2 * j + e] = (tok < t_end && tok <= q_pos[r]) ? s[j][2 * r + e] * p.scale_log2 : -INFINITY;
        }
      const float alpha = softmax_row_step(v, row_max[r], row_sum[r]);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) s[j][2 * r + e] = v[2 * j + e];
      rescale_row(acc, r, alpha);
    }

    // ---- O += P . rows[:, cols of this warp] (P's C layout is the A layout) ----
    const uint32_t pa[4] = {Mma<T>::pack(s[0][0], s[0][1]), Mma<T>::pack(s[0][2], s[0][3]),
                            Mma<T>::pack(s[1][0], s[1][1]), Mma<T>::pack(s[1][2], s[1][3])};
    {
      const T* base = rows + (((lane / 8) % 2) * 8 + lane % 8) * p.row_stride + (lane / 16) * 8;
#pragma unroll
      for (int j = 0; j < KN; j += 2) {
        const int nt = wc * p.kn + j;
        if (j < p.kn && nt * 8 < p.R) {
          uint32_t vb[4];
          ldmatrix_x4<true>(vb, base + nt * 8);
          Mma<T>::mma(acc[j], pa, vb[0], vb[1]);
          Mma<T>::mma(acc[j + 1], pa, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // the stage of tile k and sred_s are rewritten next
  }
  cp_async_wait<0>();  // the last (empty) group: nothing lands in the stages reused below

  // ---- finish: row sums over the quad, merge the WT groups, write ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  float final_max[2] = {row_max[0], row_max[1]};
  float final_sum[2] = {row_sum[0], row_sum[1]};
  if constexpr (WT > 1) {
    if (wc == 0 && lane % 4 == 0)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        stats_s[(wt * 16 + fr + 8 * r) * 2] = row_max[r];
        stats_s[(wt * 16 + fr + 8 * r) * 2 + 1] = row_sum[r];
      }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx, m_use, total;
      merge_row_stats(stats_s + (fr + 8 * r) * 2, 16 * 2, WT, mx, m_use, total);
      const float f = exp2f(row_max[r] - m_use);
#pragma unroll
      for (int j = 0; j < KN; ++j) {
        acc[j][2 * r] *= f;
        acc[j][2 * r + 1] *= f;
      }
      final_max[r] = mx;
      final_sum[r] = total;
    }
    // Groups add into merged_s one after another (fixed order: reproducible).
    for (int g = 0; g < WT; ++g) {
      if (wt == g)
#pragma unroll
        for (int j = 0; j < KN; ++j) {
          const int col = (wc * p.kn + j) * 8 + fc;
          if (j < p.kn)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int m = fr + 8 * (e / 2), c = col + e % 2;
              if (c < p.R) {
                float& dst = merged_s[m * p.R + c];
                dst = (g == 0 ? 0.f : dst) + acc[j][e];
              }
            }
        }
      __syncthreads();
    }
    if (wt != 0) return;  // group 0 writes the merged result
#pragma unroll
    for (int j = 0; j < KN; ++j) {
      const int col = (wc * p.kn + j) * 8 + fc;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = col + e % 2;
        if (j < p.kn && c < p.R) acc[j][e] = merged_s[(fr + 8 * (e / 2)) * p.R + c];
      }
    }
  }

  const bool single = p.num_splits == 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int mm = m0 + fr + 8 * r;
    if (mm >= p.M) continue;
    const float inv = final_sum[r] > 0.f ? 1.f / final_sum[r] : 0.f;
    const int64_t qrow = static_cast<int64_t>(b) * p.M + mm;
    const int64_t prow = (static_cast<int64_t>(b) * p.num_splits + split) * p.M + mm;
#pragma unroll
    for (int j = 0; j < KN; ++j) {
      const int col = (wc * p.kn + j) * 8 + fc;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col + e;
        if (j >= p.kn || c >= p.R) continue;
        const float v = acc[j][2 * r + e] * inv;
        if (single) out[qrow * p.R + c] = from_float<T>(v);
        else part_out[prow * p.R + c] = v;
      }
    }
    if (wc == 0 && lane % 4 == 0) {
      const float v = row_lse(final_max[r], final_sum[r]);
      if (single) lse[qrow] = v;
      else part_lse[prow] = v;
    }
  }
}

template <typename T, int WC, int WT, int KQ, int KN>
int prepare(size_t smem) {
  return prepare_decode_kernel<T, Shape>(mla_decode_mma_kernel<T, WC, WT, KQ, KN>, 32 * WC * WT, smem);
}

template <typename T, int WC, int WT, int KQ, int KN>
void launch(const DecodeBuffers& buf, const Shape& s, dim3 grid, size_t smem, cudaStream_t stream) {
  launch_decode_kernel<T, Shape>(mla_decode_mma_kernel<T, WC, WT, KQ, KN>, grid, 32 * WC * WT, smem,
                                 stream, buf, s);
}

}  // namespace mma_decode
}  // namespace mla_cuda

// The tensor-core kernel of one dtype and configuration; the instantiation
// files (instantiations/mla_decode_mma_*.cu) expand it once per entry of
// MLA_MMA_CONFIGS.
#define MLA_INSTANTIATE_MMA_DECODE(T, WC, WT, KQ, KN)                                    \
  template int mla_cuda::mma_decode::prepare<T, WC, WT, KQ, KN>(size_t);                 \
  template void mla_cuda::mma_decode::launch<T, WC, WT, KQ, KN>(                         \
      const mla_cuda::DecodeBuffers&, const mla_cuda::mma_decode::Shape&, dim3, size_t,  \
      cudaStream_t);
