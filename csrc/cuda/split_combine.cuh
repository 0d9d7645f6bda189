// The flash-decoding split shared by the decode kernels (mla_attention.cu)
// and quantized attention (quantized_cache.cu): how many splits a call
// takes, and the kernel that merges the splits' partial outputs by their
// log-sum-exp. A split s of sequence b writes its normalized output for row
// m at part_out[(b * num_splits + s) * M + m][0:R] and its log-sum-exp
// (natural log, -inf when the split saw no key) at part_lse[(b * num_splits
// + s) * M + m].
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"

namespace mla_cuda {
namespace {

// Most splits of one sequence: the combine kernel keeps one weight per split
// in shared memory.
constexpr int kMaxSplits = 128;

// Merges the splits of one (sequence, query row) by their log-sum-exp. A
// block takes 32 output columns of one row: warp 0 computes the split
// weights, then each of the kCombineGroups warps sums every
// kCombineGroups-th split of its lane's column (independent loads in flight
// across the warps, where one thread walking 128 splits would wait on each
// in turn), and the group sums are added in a fixed order.
constexpr int kCombineGroups = 8;

template <typename T>
__global__ void __launch_bounds__(32 * kCombineGroups)
mla_combine_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                   T* __restrict__ out, float* __restrict__ lse, int M, int R, int num_splits) {
  __shared__ float w_s[kMaxSplits];
  __shared__ float sum_s[kCombineGroups][32];
  __shared__ float total_s;
  const int m = blockIdx.x, b = blockIdx.y, lane = threadIdx.x, g = threadIdx.y;
  const int c = blockIdx.z * 32 + lane;
  const int64_t base = static_cast<int64_t>(b) * num_splits * M + m;
  if (g == 0) {
    float mx = -INFINITY;
    for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, part_lse[base + s * M]);
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float total = 0.f;
    for (int s = lane; s < num_splits; s += 32) {
      const float l = part_lse[base + s * M];  // NaN (a poisoned split) stays NaN below
      const float w = mx == -INFINITY ? (l != l ? l : 0.f) : __expf(l - mx);
      w_s[s] = w;
      total += w;
    }
    for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
    if (lane == 0) {
      total_s = total;
      // total is NaN when a split's log-sum-exp is: the row stays NaN.
      if (blockIdx.z == 0) lse[static_cast<int64_t>(b) * M + m] = total == 0.f ? -INFINITY : mx + logf(total);
    }
  }
  __syncthreads();
  float v = 0.f;
  if (c < R)
#pragma unroll 4
    for (int s = g; s < num_splits; s += kCombineGroups)
      if (w_s[s] > 0.f) v += w_s[s] * part_out[(base + s * M) * R + c];
  sum_s[g][lane] = v;
  __syncthreads();
  if (g == 0 && c < R) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kCombineGroups; ++i) total += sum_s[i][lane];
    out[(static_cast<int64_t>(b) * M + m) * R + c] = from_float<T>(total_s == 0.f ? 0.f : total / total_s);
  }
}

// The splits' partial outputs [B, num_splits, M, R] and log-sum-exps
// [B, num_splits, M] of one call; none (null pointers) for one split. They
// come from the caching allocator: inside CUDA-graph capture, from the
// graph's private pool, so the op stays capturable.
struct SplitParts {
  at::Tensor out, lse;
  float* out_ptr() const { return out.defined() ? out.data_ptr<float>() : nullptr; }
  float* lse_ptr() const { return lse.defined() ? lse.data_ptr<float>() : nullptr; }
};

inline SplitParts split_parts(int64_t B, int num_splits, int64_t M, int64_t R, const at::Tensor& like) {
  if (num_splits <= 1) return {};
  const auto opts = like.options().dtype(at::kFloat);
  return {at::empty({B, num_splits, M, R}, opts), at::empty({B, num_splits, M}, opts)};
}

// Merges the splits into out and lse (nothing to do for one split).
template <typename T>
void combine_splits(const SplitParts& parts, at::Tensor& out, at::Tensor& lse, int B, int M, int R,
                    int num_splits, cudaStream_t stream) {
  if (num_splits <= 1) return;
  mla_combine_kernel<T><<<dim3(M, B, (R + 31) / 32), dim3(32, kCombineGroups), 0, stream>>>(
      parts.out.data_ptr<float>(), parts.lse.data_ptr<float>(), out.data_ptr<T>(),
      lse.data_ptr<float>(), M, R, num_splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The flash-decoding split when the caller leaves it to the op: as many
// splits as fill the blocks the GPU holds at once, in one wave. Every block
// of a call does the same work, so a second, partial wave would leave most
// SMs idle while it runs. No split is shorter than one tile (`tile` tokens of
// the longest sequence the block table holds), and there are at most
// kMaxSplits.
int choose_num_splits(int blocks_per_split, int resident_blocks, int max_len, int tile) {
  const int useful = std::max(1, (max_len + tile - 1) / tile);
  return std::max(1, std::min({resident_blocks / blocks_per_split, useful, kMaxSplits}));
}

}  // namespace
}  // namespace mla_cuda
