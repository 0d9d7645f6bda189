// In-place partial RoPE on the GPU: q and k in one launch; the out-of-place
// op is csrc/partial_rope.cpp. Rows of whole 16-byte vectors take the
// vectorized kernel, the rest the scalar one.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

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

// The vectorized kernel, for rows of 2r values that are CH whole 16-byte
// vectors (bf16/fp16 r = 4, 8, 16; float r = 2, 4, 8) on aligned rows: one
// thread per (token, KV head) computes the cos/sin of its r pairs once and
// turns the key row and the group's query rows. Short kernels like this one
// are bound by how many memory round trips a thread waits on in sequence,
// not by bandwidth: the rows (the key first, then the queries) are loaded
// in batches of up to 4 vectors a thread, and the first batch is issued
// before the position -> frequency -> cos/sin chain, so that a group of up
// to kBatch - 1 query heads costs one round trip for its data and one for
// its stores. (A loop that loaded the next row only after storing the
// current one, as the compiler must order them when rows may alias, waited
// group + 2 round trips.) Blocks of 256 threads (the launch's), at least
// four resident an SM for one-vector rows without spilling.
template <typename T, int CH, typename Index>
__global__ void __launch_bounds__(256, CH == 1 ? 4 : 3) partial_rope_rows_kernel(T* __restrict__ q, int64_t q_st, int64_t q_sh,
                                         T* __restrict__ k, int64_t k_st, int64_t k_sh,
                                         Index total, int n_kv, int group,
                                         const int64_t* __restrict__ positions,
                                         const int64_t* __restrict__ freq_idx,
                                         const float* __restrict__ inv_freq,
                                         int n_freq, float sign) {
  constexpr int r = CH * kVec<T> / 2;
  constexpr int kBatch = CH >= 4 ? 1 : 4 / CH;  // rows loaded together: 4 vectors, 16 registers
  struct Row { uint4 v[CH]; };
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index t = idx / static_cast<Index>(n_kv);
    const int g = static_cast<int>(idx - t * static_cast<Index>(n_kv));
    T* krow = k + t * k_st + g * k_sh;
    T* qrow = q + t * q_st + static_cast<int64_t>(g) * group * q_sh;
    const int rows = group + 1;  // row 0: the key; row 1 + h: query head h of the group
    auto row_at = [&](int i) { return i == 0 ? krow : qrow + (i - 1) * q_sh; };
    Row buf[kBatch];
    auto load_batch = [&](int first) {
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (first + b < rows) {
          const uint4* src = reinterpret_cast<const uint4*>(row_at(first + b));
#pragma unroll
          for (int i = 0; i < CH; ++i) buf[b].v[i] = src[i];
        }
    };
    load_batch(0);
    float c[r], s[r];
    const int64_t pos = positions[t];
#pragma unroll
    for (int j = 0; j < r; ++j) {
      rope_cos_sin(pos, freq_idx[g * r + j], inv_freq, n_freq, c[j], s[j]);
      s[j] *= sign;
    }
    for (int first = 0; first < rows; first += kBatch) {
      if (first > 0) load_batch(first);
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (first + b < rows) {
          T* e = reinterpret_cast<T*>(buf[b].v);
#pragma unroll
          for (int j = 0; j < r; ++j) {
            float y1, y2;
            rotate_pair(to_float(e[j]), to_float(e[j + r]), c[j], s[j], y1, y2);
            e[j] = from_float<T>(y1);
            e[j + r] = from_float<T>(y2);
          }
          uint4* dst = reinterpret_cast<uint4*>(row_at(first + b));
#pragma unroll
          for (int i = 0; i < CH; ++i) dst[i] = buf[b].v[i];
        }
    }
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
  const int64_t rows_total = static_cast<int64_t>(T) * n_kv;
  MLA_DISPATCH_FLOAT_TYPES(
      q.scalar_type(), "partial_rope_cuda", [&] {
        constexpr int V = kVec<scalar_t>;
        // The vectorized kernel takes rows of 1, 2 or 4 whole 16-byte
        // vectors that start on 16-byte boundaries.
        const int ch = 2 * r % V == 0 ? 2 * r / V : 0;
        const bool rows = (ch == 1 || ch == 2 || ch == 4) && is_aligned16(q.data_ptr()) &&
                          is_aligned16(k.data_ptr()) && q.stride(0) % V == 0 && q.stride(1) % V == 0 &&
                          k.stride(0) % V == 0 && k.stride(1) % V == 0;
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
        auto launch_rows = [&](auto ch_tag) {
          constexpr int CH = decltype(ch_tag)::value;
          const dim3 row_grid(std::min<int64_t>((rows_total + kThreads - 1) / kThreads, 1 << 20));
          auto run = [&](auto index_tag) {
            using Index = decltype(index_tag);
            partial_rope_rows_kernel<scalar_t, CH, Index>
                <<<row_grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                    q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
                    k.data_ptr<scalar_t>(), k.stride(0), k.stride(1),
                    static_cast<Index>(rows_total), n_kv, n_h / n_kv, positions.data_ptr<int64_t>(),
                    rope_freq_idx.data_ptr<int64_t>(), inv_freq.data_ptr<float>(),
                    inv_freq.size(0), inverse ? -1.f : 1.f);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          if (rows_total + static_cast<int64_t>(row_grid.x) * kThreads < (int64_t(1) << 32)) run(uint32_t{});
          else run(int64_t{});
        };
        if (rows && ch == 1) launch_rows(std::integral_constant<int, 1>{});
        else if (rows && ch == 2) launch_rows(std::integral_constant<int, 2>{});
        else if (rows && ch == 4) launch_rows(std::integral_constant<int, 4>{});
        // 32-bit indices while the grid-stride counter cannot overflow.
        else if (total + static_cast<int64_t>(grid.x) * kThreads < (int64_t(1) << 32)) launch(uint32_t{});
        else launch(int64_t{});
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("partial_rope_", &partial_rope_inplace_cuda);
}

}  // namespace mla_cuda
