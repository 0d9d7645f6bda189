// CPU reference of the quantized latent cache (docs/ops.md, "Quantized
// caches"): the append that quantizes each token's latent as it writes the
// row, and absorbed attention that dequantizes each row as it reads it.
// Row layout and code maps: csrc/quantized_format.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <torch/library.h>
#include <utility>
#include <vector>

#include "../ops.h"
#include "paged_reference.h"

namespace mla_cuda {

void latent_cache_append_quantized_cpu(
    const at::Tensor& c_kv, const at::Tensor& k_rope, at::Tensor& latent_cache,
    const at::Tensor& slot_mapping, const std::string& cache_format,
    const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq) {
  const QuantLayout l = check_append_quantized_args(
      c_kv, k_rope, latent_cache, slot_mapping, cache_format, positions,
      rope_freq_idx, inv_freq);
  const int64_t T = c_kv.size(0);
  const int64_t n_kv = k_rope.size(1), rope2 = k_rope.size(2), r = rope2 / 2;
  const int64_t num_slots = latent_cache.size(0) * latent_cache.size(1);
  const AppendRope rope = check_append_indices(
      slot_mapping, num_slots, positions, rope_freq_idx, inv_freq, n_kv * r);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  uint8_t* cache = latent_cache.data_ptr<uint8_t>();
  MLA_DISPATCH_FLOAT_TYPES(c_kv.scalar_type(), "append_quantized_cpu", [&] {
    const scalar_t* src_c = c_kv.data_ptr<scalar_t>();
    const scalar_t* src_k = k_rope.data_ptr<scalar_t>();
    const int64_t sc = c_kv.stride(0), sk = k_rope.stride(0);
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;  // padding token
        uint8_t* row = cache + slots[t] * l.row_bytes;
        std::memset(row, 0, l.row_bytes);  // gaps and pad are zero bytes
        const scalar_t* c = src_c + t * sc;
        for (int64_t s = 0; s < l.num_scales; ++s) {
          float amax = 0.f;
          for (int64_t d = s * l.group; d < (s + 1) * l.group; ++d)
            amax = nan_abs_max(float(c[d]), amax);
          const float scale = quant_scale(l.kind, amax);
          const float inv = quant_inv_scale(l.kind, amax);
          std::memcpy(row + l.scale_offset + 4 * s, &scale, 4);
          for (int64_t d = s * l.group; d < (s + 1) * l.group; ++d) {
            if (l.kind == QuantKind::kFp8)
              row[d] = fp8_code(float(c[d]), inv);
            else
              row[d >> 1] |= static_cast<uint8_t>(
                  (int4_code(float(c[d]), inv) & 0xF) << ((d & 1) * 4));
          }
        }
        for (int64_t g = 0; g < n_kv; ++g) {
          const scalar_t* x = src_k + t * sk + g * rope2;
          scalar_t y[2];
          for (int64_t j = 0; j < r; ++j) {
            rope.pair(x, t, g, j, r, y[0], y[1]);
            uint8_t* dst = row + l.rope_offset + g * rope2 * sizeof(scalar_t);
            std::memcpy(dst + j * sizeof(scalar_t), &y[0], sizeof(scalar_t));
            std::memcpy(dst + (j + r) * sizeof(scalar_t), &y[1], sizeof(scalar_t));
          }
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> mla_attention_quantized_cpu(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, const std::string& cache_format,
    int64_t kv_heads) {
  const QuantLayout l = check_attention_quantized_args(
      q_latent, q_rope, latent_cache, block_table, seq_lens, cache_format,
      kv_heads);
  const int64_t B = q_latent.size(0), Q = q_latent.size(1);
  const int64_t n_h = q_latent.size(2), R = q_latent.size(3);
  const int64_t rope2 = q_rope.size(3), group = n_h / kv_heads;
  const int64_t block_size = latent_cache.size(1);
  const int64_t max_blocks = block_table.size(1);
  check_block_tables(seq_lens, block_table, Q, latent_cache.size(0),
                     block_size);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  at::Tensor out = at::empty_like(q_latent);
  at::Tensor lse = at::empty({B, Q, n_h}, q_latent.options().dtype(at::kFloat));
  float* lse_ptr = lse.data_ptr<float>();
  const uint8_t* cache = latent_cache.data_ptr<uint8_t>();
  MLA_DISPATCH_FLOAT_TYPES(q_latent.scalar_type(), "mla_attention_quantized_cpu", [&] {
    const scalar_t* ql = q_latent.data_ptr<scalar_t>();
    const scalar_t* qr = q_rope.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // One (sequence, query, KV head) per task: its rows are dequantized once
    // and serve every query head of the group.
    at::parallel_for(0, B * Q * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> c, k, score, acc(R);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task % kv_heads, i = (task / kv_heads) % Q;
        const int64_t b = task / (kv_heads * Q);
        const int64_t n_keys = lens[b] == 0 ? 0 : lens[b] - Q + i + 1;
        c.resize(n_keys * R);
        k.resize(n_keys * rope2);
        for (int64_t t = 0; t < n_keys; ++t) {
          const uint8_t* row =
              cache + (table[b * max_blocks + t / block_size] * block_size +
                       t % block_size) * l.row_bytes;
          for (int64_t d = 0; d < R; ++d)
            c[t * R + d] = quant_attention_value<scalar_t>(quant_channel_value(row, l, d), l);
          const uint8_t* rope = row + l.rope_offset + g * rope2 * sizeof(scalar_t);
          for (int64_t d = 0; d < rope2; ++d) {
            scalar_t v;
            std::memcpy(&v, rope + d * sizeof(scalar_t), sizeof(scalar_t));
            k[t * rope2 + d] = float(v);
          }
        }
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const int64_t idx = (b * Q + i) * n_h + h;
          const scalar_t* q1 = ql + idx * R;
          const scalar_t* q2 = qr + idx * rope2;
          auto key = [&](int64_t t) {
            return std::pair{c.data() + t * R, k.data() + t * rope2};
          };
          attend_one_head(q1, q2, n_keys, R, rope2, scale, key, score, acc,
                          o + idx * R, lse_ptr[idx]);
        }
      }
    });
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("latent_cache_append_quantized", &latent_cache_append_quantized_cpu);
  m.impl("mla_attention_quantized", &mla_attention_quantized_cpu);
}

}  // namespace mla_cuda
