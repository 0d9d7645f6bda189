// The online softmax both tensor-core decode kernels (mla_decode_mma.cuh,
// mla_decode_warp.cuh) keep for each query row of an mma fragment: scores
// in the log2 domain, a running max and a running sum per lane, the four
// lanes of a quad holding one row between them.
#pragma once

#include <cmath>

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

}  // namespace mla_cuda
