// The flash-decoding split shared by the decode kernels (mla_attention.cu)
// and quantized attention (quantized_cache.cu): the kernel that merges the
// splits' partial outputs by their log-sum-exp (how many splits a call
// takes: ../split_choice.h). A split s of sequence b writes its normalized
// output for row m at part_out[(b * num_splits + s) * M + m][0:R] and its
// log-sum-exp (natural log, -inf when the split saw no key) at
// part_lse[(b * num_splits + s) * M + m].
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "../split_choice.h"
#include "common.cuh"

namespace mla_cuda {
namespace {

// Merges the splits of one (sequence, query row) by their log-sum-exp. A
// block of kCombineThreads takes one row and a run of its columns: its
// threads form `groups` groups of col_threads, a thread of group g holds V
// consecutive columns (V = 4, one 16-byte load, where R is a multiple of 4)
// and sums every groups-th split starting at g; the group sums are then
// added in a fixed order (reproducible). The host picks the groups so that
// a call of few splits (many sequences) takes one load a thread from
// thousands of blocks, and one of many splits (one long sequence) spreads
// each column's splits over 8 groups. A thread issues kCombineBatch loads
// before it waits on any, and its first batch before the split weights are
// known: the weights (warp 0, from the splits' log-sum-exps) and the
// partial outputs arrive in one memory round trip, not two.
constexpr int kCombineThreads = 256;
constexpr int kCombineBatch = 8;

template <typename T, int V>
__global__ void __launch_bounds__(kCombineThreads)
mla_combine_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                   T* __restrict__ out, float* __restrict__ lse, int M, int R, int num_splits, int col_threads) {
  using Vec = std::conditional_t<V == 4, float4, float>;
  __shared__ float w_s[kMaxSplits];
  __shared__ Vec sum_s[kCombineThreads];  // a thread's V sums as one vector: no bank conflicts
  __shared__ float total_s;
  const int m = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid % 32;
  const int groups = kCombineThreads / col_threads, g = tid / col_threads, ct = tid % col_threads;
  const int c = (blockIdx.z * col_threads + ct) * V;
  const int64_t base = static_cast<int64_t>(b) * num_splits * M + m;
  Vec x[kCombineBatch] = {};
  // Launched as a programmatic dependent of the decode kernel (sm_90+):
  // this block may be resident before the decode grid has finished, and
  // waits here until its writes are visible.
  wait_for_primary_grid();
  auto load = [&](int s0) {
#pragma unroll
    for (int i = 0; i < kCombineBatch; ++i) {
      const int s = s0 + i * groups;
      if (s < num_splits && c < R) x[i] = *reinterpret_cast<const Vec*>(part_out + (base + static_cast<int64_t>(s) * M) * R + c);
    }
  };
  load(g);
  if (tid < 32) {
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
  alignas(sizeof(Vec)) float acc[V] = {};
  for (int s0 = g; s0 < num_splits; s0 += kCombineBatch * groups) {
    if (s0 != g) load(s0);
#pragma unroll
    for (int i = 0; i < kCombineBatch; ++i) {
      const int s = s0 + i * groups;
      // A split with no keys (weight 0) is skipped, not multiplied: its partial may be anything.
      if (s < num_splits && w_s[s] > 0.f) {
        const float* v = reinterpret_cast<const float*>(&x[i]);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += w_s[s] * v[k];
      }
    }
  }
  sum_s[tid] = *reinterpret_cast<const Vec*>(acc);
  __syncthreads();
  if (g == 0 && c < R) {
    float total[V] = {};
    for (int i = 0; i < groups; ++i) {
      const Vec part = sum_s[i * col_threads + ct];
      const float* v = reinterpret_cast<const float*>(&part);
#pragma unroll
      for (int k = 0; k < V; ++k) total[k] += v[k];
    }
#pragma unroll
    for (int k = 0; k < V; ++k)
      out[(static_cast<int64_t>(b) * M + m) * R + c + k] = from_float<T>(total_s == 0.f ? 0.f : total[k] / total_s);
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

// Merges the splits into out and lse (nothing to do for one split). Groups
// of threads over splits: as many as there are splits, up to 8; the rest of
// a block's threads lie along the columns.
template <typename T>
void combine_splits(const SplitParts& parts, at::Tensor& out, at::Tensor& lse, int B, int M, int R,
                    int num_splits, cudaStream_t stream) {
  if (num_splits <= 1) return;
  const bool vec = R % 4 == 0;
  const int cols = vec ? R / 4 : R;  // threads one row needs along its columns
  int groups = 1;
  while (groups < std::min(num_splits, 8)) groups *= 2;
  int col_threads = kCombineThreads / groups;
  while (col_threads > 32 && col_threads / 2 >= cols) col_threads /= 2;  // short rows: more groups, no idle columns
  const dim3 grid(M, B, (cols + col_threads - 1) / col_threads);
  // A programmatic dependent launch: the merge's launch and block setup
  // overlap the decode kernel's last blocks instead of following them
  // (at batch 1 the two kernels are a few microseconds each); the kernel
  // waits for the decode grid's results before its first load.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kCombineThreads);
  config.stream = stream;
  config.attrs = attr;
  // The attribute is Hopper's (sm_90+); older GPUs take a plain launch.
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, out.get_device()));
  config.numAttrs = major >= 9 ? 1 : 0;
  auto launch = [&](auto kernel) {
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<const float*>(parts.out.data_ptr<float>()),
                                      static_cast<const float*>(parts.lse.data_ptr<float>()), out.data_ptr<T>(),
                                      lse.data_ptr<float>(), M, R, num_splits, col_threads));
  };
  if (vec) launch(mla_combine_kernel<T, 4>);
  else launch(mla_combine_kernel<T, 1>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mla_cuda
