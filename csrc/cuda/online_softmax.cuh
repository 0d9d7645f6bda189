// The online softmax the mma.sync decode kernels (mla_decode_mma.cuh,
// mla_decode_warp.cuh, mla_decode_quant.cuh) keep for each query row of an
// mma fragment: scores in the log2 domain, a running max and a running sum
// per lane, the four lanes of a quad holding one row between them; and the
// merge of their warps' partial rows at the end.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace mla_cuda {

// One step over this lane's N new scores of a row (already scaled; -inf
// where masked): the quad's max joins the running max, the scores become
// exp2(score - max) and their sum joins the running sum. Returns alpha, the
// factor by which the row's earlier sum and accumulator shrink.
template <int N>
__device__ __forceinline__ float softmax_row_step(float (&v)[N], float& row_max, float& row_sum) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) mx = fmaxf(mx, v[i]);
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(row_max, mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // an all-masked row stays at zero weight
  const float alpha = exp2f(row_max - m_use);
  row_max = m_new;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = exp2f(v[i] - m_use);
    sum += v[i];
  }
  row_sum = row_sum * alpha + sum;
  return alpha;
}

// Shrinks row r of an accumulator of KN mma C fragments (values 2r and
// 2r + 1 of each) by alpha. Once the running max settles alpha is 1 for
// the whole warp, and the rescale is skipped.
template <int KN>
__device__ __forceinline__ void rescale_row(float (&acc)[KN][4], int r, float alpha) {
  if (__any_sync(0xffffffffu, alpha != 1.f))
#pragma unroll
    for (int j = 0; j < KN; ++j) {
      acc[j][2 * r] *= alpha;
      acc[j][2 * r + 1] *= alpha;
    }
}

// Merges `count` partial (max, sum) pairs of one row, stats[i * stride] and
// stats[i * stride + 1], in index order (reproducible): the common max and
// the total at that max. `m_use` is the max to scale by (0 when every part
// is empty).
__device__ __forceinline__ void merge_row_stats(const float* stats, int stride, int count,
                                                float& mx, float& m_use, float& total) {
  mx = -INFINITY;
  for (int i = 0; i < count; ++i) mx = fmaxf(mx, stats[i * stride]);
  m_use = mx == -INFINITY ? 0.f : mx;
  total = 0.f;
  for (int i = 0; i < count; ++i) total += stats[i * stride + 1] * exp2f(stats[i * stride] - m_use);
}

// The block's 16 output rows from its NW warps' partials, once every warp
// has put its part of row m (already scaled to the merged max) in
// slab_s[(w * 16 + m) * R + c] and the merged (max, total) of row m in
// final_s[2 m], 2 m + 1, and the block has synchronized: warps take rows,
// lanes columns; the warps' parts summed in warp order (reproducible),
// divided by the total and written as the output (one split) or the
// split's partial output, with each row's log-sum-exp. Shape: the kernel's
// (M, R, num_splits).
template <int NW, typename T, typename Shape>
__device__ __forceinline__ void write_rows_from_slabs(const float* slab_s, const float* final_s, const Shape& p,
                                                      int m0, int b, int split, T* __restrict__ out,
                                                      float* __restrict__ lse, float* __restrict__ part_out,
                                                      float* __restrict__ part_lse, int warp, int lane, int tid) {
  const bool single = p.num_splits == 1;
  const int rows_here = min(16, p.M - m0);
  for (int m = warp; m < rows_here; m += NW) {
    const int mm = m0 + m;
    const float total = final_s[m * 2 + 1];
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int c = lane; c < p.R; c += 32) {
      float v = 0.f;
      for (int w = 0; w < NW; ++w) v += slab_s[(w * 16 + m) * p.R + c];
      v *= inv;
      if (single) out[(static_cast<int64_t>(b) * p.M + mm) * p.R + c] = from_float<T>(v);
      else part_out[((static_cast<int64_t>(b) * p.num_splits + split) * p.M + mm) * p.R + c] = v;
    }
  }
  if (tid < rows_here) {
    const float mx = final_s[tid * 2], total = final_s[tid * 2 + 1];
    const float v = row_lse(mx, total);
    const int mm = m0 + tid;
    if (single) lse[static_cast<int64_t>(b) * p.M + mm] = v;
    else part_lse[(static_cast<int64_t>(b) * p.num_splits + split) * p.M + mm] = v;
  }
}

}  // namespace mla_cuda
