// In-place partial RoPE on the GPU: q and k in one launch; the out-of-place
// op is csrc/partial_rope.cpp.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "common.cuh"

namespace mla_cuda {
namespace {

// One thread per (token, KV head, pair j): it computes cos/sin once and turns
// pair j of the KV head's key and of every query head of its group (they
// share the frequency). The threads of a head are adjacent, so a warp's
// accesses cover contiguous head rows. Index arithmetic is 32-bit (Index =
// uint32_t) whenever the element count allows: 64-bit division by a runtime
// divisor costs more than the rotation itself.
template <typename T, typename Index>
__global__ void partial_rope_kernel(T* __restrict__ q, int64_t q_st, int64_t q_sh,
                                    T* __restrict__ k, int64_t k_st, int64_t k_sh,
                                    Index total, int n_h, int n_kv, int r,
                                    const int64_t* __restrict__ positions,
                                    const int64_t* __restrict__ freq_idx,
                                    const float* __restrict__ inv_freq,
                                    int n_freq, float sign) {
  const Index pairs = static_cast<Index>(n_kv) * r;
  const int group = n_h / n_kv;
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index t = idx / pairs;
    const int gj = static_cast<int>(idx - t * pairs);
    const int g = gj / r, j = gj - g * r;
    float c, s;
    rope_cos_sin(positions[t], freq_idx[gj], inv_freq, n_freq, c, s);
    s *= sign;
    auto turn = [&](T* v) {
      float y1, y2;
      rotate_pair(to_float(v[j]), to_float(v[j + r]), c, s, y1, y2);
      v[j] = from_float<T>(y1);
      v[j + r] = from_float<T>(y2);
    };
    turn(k + t * k_st + g * k_sh);
    T* qh = q + t * q_st + static_cast<int64_t>(g) * group * q_sh;
    for (int hh = 0; hh < group; ++hh) turn(qh + hh * q_sh);
  }
}

}  // namespace

void partial_rope_inplace_cuda(at::Tensor& q, at::Tensor& k,
                               const at::Tensor& positions,
                               const at::Tensor& rope_freq_idx,
                               const at::Tensor& inv_freq, bool inverse) {
  check_rope_args(q, k, positions, rope_freq_idx, inv_freq);
  const int T = q.size(0), n_h = q.size(1), n_kv = k.size(1), r = q.size(2) / 2;
  const int64_t total = static_cast<int64_t>(T) * n_kv * r;
  if (total == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  constexpr int kThreads = 256;
  const dim3 grid(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20));
  MLA_DISPATCH_FLOAT_TYPES(
      q.scalar_type(), "partial_rope_cuda", [&] {
        auto launch = [&](auto total_tag) {
          using Index = decltype(total_tag);
          partial_rope_kernel<scalar_t, Index>
              <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
                  k.data_ptr<scalar_t>(), k.stride(0), k.stride(1),
                  static_cast<Index>(total), n_h, n_kv, r, positions.data_ptr<int64_t>(),
                  rope_freq_idx.data_ptr<int64_t>(), inv_freq.data_ptr<float>(),
                  inv_freq.size(0), inverse ? -1.f : 1.f);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        // 32-bit indices while the grid-stride counter cannot overflow.
        if (total + static_cast<int64_t>(grid.x) * kThreads < (int64_t(1) << 32)) launch(uint32_t{});
        else launch(int64_t{});
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("partial_rope_", &partial_rope_inplace_cuda);
}

}  // namespace mla_cuda
