// CPU reference of the latent-cache append (docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <torch/library.h>

#include "../ops.h"

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
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  // Validate every index before the first write: a bad call leaves the cache
  // as it was.
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] < num_slots, "mla_cuda: slot_mapping[", t, "] = ",
                slots[t], " is out of range for a cache of ", num_slots,
                " slots");
  const bool fused_rope = positions.has_value();
  const int64_t* pos = fused_rope ? positions->data_ptr<int64_t>() : nullptr;
  const int64_t* fidx = fused_rope ? rope_freq_idx->data_ptr<int64_t>() : nullptr;
  const float* ifreq = fused_rope ? inv_freq->data_ptr<float>() : nullptr;
  if (fused_rope) {
    const int64_t n_freq = inv_freq->size(0);
    for (int64_t i = 0; i < n_kv * r; ++i)
      TORCH_CHECK(fidx[i] >= 0 && fidx[i] < n_freq, "mla_cuda: rope_freq_idx "
                  "holds ", fidx[i], ", outside [0, ", n_freq, ")");
  }
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
              for (int64_t j = 0; j < r; ++j) {
                const float x1 = x[j], x2 = x[j + r];
                if (!fused_rope) {
                  y[j] = x[j];
                  y[j + r] = x[j + r];
                  continue;
                }
                const float angle = static_cast<float>(pos[t]) *
                                    ifreq[fidx[g * r + j]];
                const float c = std::cos(angle), s = std::sin(angle);
                y[j] = static_cast<scalar_t>(x1 * c - x2 * s);
                y[j + r] = static_cast<scalar_t>(x2 * c + x1 * s);
              }
            }
          }
        });
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("latent_cache_append", &latent_cache_append_cpu);
}

}  // namespace mla_cuda
