// CPU reference of absorbed MLA attention over the paged latent cache
// (docs/ops.md): one pass per (sequence, query, head) with
// float accumulation. num_splits only matters to the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <utility>
#include <vector>

#include "../ops.h"
#include "paged_reference.h"

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
  const int64_t block_size = latent_cache.size(1);
  const int64_t max_blocks = block_table.size(1);
  check_block_tables(seq_lens, block_table, Q, latent_cache.size(0),
                     block_size);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
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
            auto key = [&](int64_t t) {
              const scalar_t* row =
                  cache + (table[b * max_blocks + t / block_size] * block_size +
                           t % block_size) * D;
              return std::pair{row, row + rope_off};
            };
            attend_one_head(q1, q2, n_keys, R, rope2, scale, key, score, acc,
                            o + idx * R, lse_ptr[idx]);
          }
        });
      });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("mla_attention", &mla_attention_cpu);
}

}  // namespace mla_cuda
