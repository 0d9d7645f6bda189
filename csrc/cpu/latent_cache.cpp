// CPU reference of the latent-cache append (docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops.h"
#include "paged_reference.h"

namespace mla_cuda {

void latent_cache_append_cpu(const at::Tensor& c_kv, const at::Tensor& k_rope,
                             at::Tensor& latent_cache,
                             const at::Tensor& slot_mapping,
                             const c10::optional<at::Tensor>& positions,
                             const c10::optional<at::Tensor>& rope_freq_idx,
                             const c10::optional<at::Tensor>& inv_freq) {
  check_append_args(c_kv, k_rope, latent_cache, slot_mapping, positions,
                    rope_freq_idx, inv_freq);
  const int64_t T = c_kv.size(0), R = c_kv.size(1);
  const int64_t n_kv = k_rope.size(1), rope2 = k_rope.size(2), r = rope2 / 2;
  const int64_t D = latent_cache.size(2);
  const int64_t num_slots = latent_cache.size(0) * latent_cache.size(1);
  const AppendRope rope = check_append_indices(
      slot_mapping, num_slots, positions, rope_freq_idx, inv_freq, n_kv * r);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  MLA_DISPATCH_FLOAT_TYPES(
      latent_cache.scalar_type(), "append_cpu", [&] {
        const scalar_t* src_c = c_kv.data_ptr<scalar_t>();
        const scalar_t* src_k = k_rope.data_ptr<scalar_t>();
        scalar_t* cache = latent_cache.data_ptr<scalar_t>();
        const int64_t sc = c_kv.stride(0), sk = k_rope.stride(0);
        at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            if (slots[t] < 0) continue;  // padding token
            scalar_t* row = cache + slots[t] * D;
            for (int64_t i = 0; i < R; ++i) row[i] = src_c[t * sc + i];
            for (int64_t g = 0; g < n_kv; ++g) {
              const scalar_t* x = src_k + t * sk + g * rope2;
              scalar_t* y = row + R + g * rope2;
              for (int64_t j = 0; j < r; ++j)
                rope.pair(x, t, g, j, r, y[j], y[j + r]);
            }
          }
        });
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("latent_cache_append", &latent_cache_append_cpu);
}

}  // namespace mla_cuda
