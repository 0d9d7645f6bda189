// CPU reference of absorbed MLA attention over the paged latent cache
// (docs/ops.md): one pass per (sequence, query, head) with
// float accumulation. num_splits only matters to the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <torch/library.h>
#include <vector>

#include "../ops.h"

namespace mla_cuda {

std::tuple<at::Tensor, at::Tensor> mla_attention_cpu(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, int64_t num_splits) {
  check_attention_args(q_latent, q_rope, latent_cache, block_table, seq_lens);
  const int64_t B = q_latent.size(0), Q = q_latent.size(1);
  const int64_t n_h = q_latent.size(2), R = q_latent.size(3);
  const int64_t rope2 = q_rope.size(3), D = latent_cache.size(2);
  const int64_t n_kv = (D - R) / rope2, group = n_h / n_kv;
  const int64_t num_blocks = latent_cache.size(0);
  const int64_t block_size = latent_cache.size(1);
  const int64_t max_blocks = block_table.size(1);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= Q || (lens[b] == 0 && Q == 1),
                "mla_cuda: seq_lens[", b, "] = ", lens[b],
                " is shorter than the ", Q, " query tokens it must hold");
    TORCH_CHECK(lens[b] <= max_blocks * block_size, "mla_cuda: seq_lens[", b,
                "] = ", lens[b], " is over the block table's capacity of ",
                max_blocks * block_size, " tokens");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(table[b * max_blocks + i] >= 0 &&
                      table[b * max_blocks + i] < num_blocks,
                  "mla_cuda: block_table[", b, ", ", i, "] = ",
                  table[b * max_blocks + i], " is outside the cache's ",
                  num_blocks, " blocks");
  }
  at::Tensor out = at::empty_like(q_latent);
  at::Tensor lse = at::empty({B, Q, n_h}, q_latent.options().dtype(at::kFloat));
  float* lse_ptr = lse.data_ptr<float>();
  MLA_DISPATCH_FLOAT_TYPES(
      q_latent.scalar_type(), "mla_attention_cpu",
      [&] {
        const scalar_t* ql = q_latent.data_ptr<scalar_t>();
        const scalar_t* qr = q_rope.data_ptr<scalar_t>();
        const scalar_t* cache = latent_cache.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, B * Q * n_h, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> score, acc(R);
          for (int64_t idx = begin; idx < end; ++idx) {
            const int64_t h = idx % n_h, i = (idx / n_h) % Q, b = idx / (n_h * Q);
            const int64_t n_keys = lens[b] == 0 ? 0 : lens[b] - Q + i + 1;
            const scalar_t* q1 = ql + idx * R;
            const scalar_t* q2 = qr + idx * rope2;
            const int64_t rope_off = R + (h / group) * rope2;
            score.assign(n_keys, 0.f);
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t t = 0; t < n_keys; ++t) {
              const scalar_t* row =
                  cache + (table[b * max_blocks + t / block_size] * block_size +
                           t % block_size) * D;
              float s = 0.f;
              for (int64_t d = 0; d < R; ++d) s += float(q1[d]) * float(row[d]);
              for (int64_t d = 0; d < rope2; ++d)
                s += float(q2[d]) * float(row[rope_off + d]);
              score[t] = s * static_cast<float>(scale);
              m = std::max(m, score[t]);
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            float l = 0.f;
            for (int64_t t = 0; t < n_keys; ++t) {
              const scalar_t* row =
                  cache + (table[b * max_blocks + t / block_size] * block_size +
                           t % block_size) * D;
              const float p = std::exp(score[t] - m);
              l += p;
              for (int64_t d = 0; d < R; ++d) acc[d] += p * float(row[d]);
            }
            // An empty sequence attends to nothing: zeros and lse = -inf.
            const float inv_l = l > 0.f ? 1.f / l : 0.f;
            for (int64_t d = 0; d < R; ++d)
              o[idx * R + d] = static_cast<scalar_t>(acc[d] * inv_l);
            lse_ptr[idx] = l > 0.f ? m + std::log(l)
                                   : -std::numeric_limits<float>::infinity();
          }
        });
      });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("mla_attention", &mla_attention_cpu);
}

}  // namespace mla_cuda
