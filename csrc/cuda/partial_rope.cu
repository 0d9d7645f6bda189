// Partial RoPE on the GPU: q and k in one launch, one thread per
// (token, head) turning that head's r pairs.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "common.cuh"

namespace mla_cuda {
namespace {

// One thread per rotation pair (token, head, j): the r threads of a head are
// adjacent, so a warp's loads of x[j] and of x[j + r] each cover whole
// contiguous head rows (coalesced), whatever r is.
template <typename T>
__global__ void partial_rope_kernel(T* __restrict__ q, int64_t q_st, int64_t q_sh,
                                    T* __restrict__ k, int64_t k_st, int64_t k_sh,
                                    int num_tokens, int n_h, int n_kv, int r,
                                    const int64_t* __restrict__ positions,
                                    const int64_t* __restrict__ freq_idx,
                                    const float* __restrict__ inv_freq,
                                    int n_freq, float sign) {
  const int heads = n_h + n_kv;
  const int64_t total = static_cast<int64_t>(num_tokens) * heads * r;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = idx % r;
    const int64_t th = idx / r;
    const int t = th / heads, h = th % heads;
    const bool is_q = h < n_h;
    // Query head h uses the frequencies of its KV head h / (n_h / n_kv).
    const int g = is_q ? h / (n_h / n_kv) : h - n_h;
    T* v = is_q ? q + t * q_st + h * q_sh : k + t * k_st + g * k_sh;
    float c, s;
    rope_cos_sin(positions[t], freq_idx[g * r + j], inv_freq, n_freq, c, s);
    float y1, y2;
    rotate_pair(to_float(v[j]), to_float(v[j + r]), c, sign * s, y1, y2);
    v[j] = from_float<T>(y1);
    v[j + r] = from_float<T>(y2);
  }
}

}  // namespace

void partial_rope_inplace_cuda(at::Tensor& q, at::Tensor& k,
                               const at::Tensor& positions,
                               const at::Tensor& rope_freq_idx,
                               const at::Tensor& inv_freq, bool inverse) {
  check_rope_args(q, k, positions, rope_freq_idx, inv_freq);
  const int T = q.size(0), n_h = q.size(1), n_kv = k.size(1), r = q.size(2) / 2;
  const int64_t total = static_cast<int64_t>(T) * (n_h + n_kv) * r;
  if (total == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  constexpr int kThreads = 256;
  const dim3 grid(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20));
  MLA_DISPATCH_FLOAT_TYPES(
      q.scalar_type(), "partial_rope_cuda", [&] {
        partial_rope_kernel<scalar_t>
            <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
                k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), T, n_h, n_kv,
                r, positions.data_ptr<int64_t>(),
                rope_freq_idx.data_ptr<int64_t>(), inv_freq.data_ptr<float>(),
                inv_freq.size(0), inverse ? -1.f : 1.f);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("partial_rope_", &partial_rope_inplace_cuda);
  m.impl("partial_rope", &partial_rope_out_of_place);
}

}  // namespace mla_cuda
