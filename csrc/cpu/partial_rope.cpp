// CPU reference of in-place partial RoPE (docs/ops.md); the out-of-place op
// is csrc/partial_rope.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <torch/library.h>

#include "../ops.h"

namespace mla_cuda {
namespace {

// Rotates every head of x [T, H, 2r]; head h belongs to KV head h / group.
template <typename scalar_t>
void rotate_heads(scalar_t* x, int64_t T, int64_t H, int64_t r, int64_t st,
                  int64_t sh, int64_t group, const int64_t* pos,
                  const int64_t* fidx, const float* ifreq, float sign) {
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < H; ++h) {
        scalar_t* v = x + t * st + h * sh;
        const int64_t g = h / group;
        for (int64_t j = 0; j < r; ++j) {
          const float angle = static_cast<float>(pos[t]) * ifreq[fidx[g * r + j]];
          const float c = std::cos(angle), s = sign * std::sin(angle);
          const float x1 = v[j], x2 = v[j + r];
          v[j] = static_cast<scalar_t>(x1 * c - x2 * s);
          v[j + r] = static_cast<scalar_t>(x2 * c + x1 * s);
        }
      }
  });
}

}  // namespace

void partial_rope_inplace_cpu(at::Tensor& q, at::Tensor& k,
                              const at::Tensor& positions,
                              const at::Tensor& rope_freq_idx,
                              const at::Tensor& inv_freq, bool inverse) {
  check_rope_args(q, k, positions, rope_freq_idx, inv_freq);
  const int64_t T = q.size(0), n_h = q.size(1), n_kv = k.size(1);
  const int64_t r = q.size(2) / 2, n_freq = inv_freq.size(0);
  const int64_t* fidx = rope_freq_idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_kv * r; ++i)
    TORCH_CHECK(fidx[i] >= 0 && fidx[i] < n_freq, "mla_cuda: rope_freq_idx "
                "holds ", fidx[i], ", outside [0, ", n_freq, ")");
  const float sign = inverse ? -1.f : 1.f;
  MLA_DISPATCH_FLOAT_TYPES(
      q.scalar_type(), "partial_rope_cpu", [&] {
        rotate_heads(q.data_ptr<scalar_t>(), T, n_h, r, q.stride(0),
                     q.stride(1), n_h / n_kv, positions.data_ptr<int64_t>(),
                     fidx, inv_freq.data_ptr<float>(), sign);
        rotate_heads(k.data_ptr<scalar_t>(), T, n_kv, r, k.stride(0),
                     k.stride(1), 1, positions.data_ptr<int64_t>(), fidx,
                     inv_freq.data_ptr<float>(), sign);
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("partial_rope_", &partial_rope_inplace_cpu);
}

}  // namespace mla_cuda
