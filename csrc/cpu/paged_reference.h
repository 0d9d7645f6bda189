// What the CPU references of the 16-bit and the quantized latent caches
// share (docs/ops.md): the index checks that run before any write or read,
// the append's rotation of one rope-key pair, and the exact softmax
// attention of one query head. One copy, so both caches compute alike.
#pragma once

#include <ATen/ATen.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mla_cuda {

// seq_lens against the query count and the block table, and every block of
// the table a sequence uses, checked before the first read.
inline void check_block_tables(const at::Tensor& seq_lens,
                               const at::Tensor& block_table, int64_t Q,
                               int64_t num_blocks, int64_t block_size) {
  const int64_t B = seq_lens.size(0), max_blocks = block_table.size(1);
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
}

// The append's RoPE tables (none: the rope keys are copied as they are).
struct AppendRope {
  bool fused = false;
  const int64_t* pos = nullptr;
  const int64_t* fidx = nullptr;
  const float* ifreq = nullptr;

  // Pair (j, j + r) of the rope key x of KV head g of token t, rotated by
  // the token's position when the tables were given.
  template <typename scalar_t>
  void pair(const scalar_t* x, int64_t t, int64_t g, int64_t j, int64_t r,
            scalar_t& y1, scalar_t& y2) const {
    if (!fused) {
      y1 = x[j];
      y2 = x[j + r];
      return;
    }
    const float x1 = x[j], x2 = x[j + r];
    const float angle = static_cast<float>(pos[t]) * ifreq[fidx[g * r + j]];
    const float c = std::cos(angle), s = std::sin(angle);
    y1 = static_cast<scalar_t>(x1 * c - x2 * s);
    y2 = static_cast<scalar_t>(x2 * c + x1 * s);
  }
};

// Every slot and every RoPE frequency index (n_pairs of them) validated
// before the first write: a bad call leaves the cache as it was.
inline AppendRope check_append_indices(
    const at::Tensor& slot_mapping, int64_t num_slots,
    const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq, int64_t n_pairs) {
  const int64_t T = slot_mapping.size(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] < num_slots, "mla_cuda: slot_mapping[", t, "] = ",
                slots[t], " is out of range for a cache of ", num_slots,
                " slots");
  AppendRope rope;
  rope.fused = positions.has_value();
  if (!rope.fused) return rope;
  rope.pos = positions->data_ptr<int64_t>();
  rope.fidx = rope_freq_idx->data_ptr<int64_t>();
  rope.ifreq = inv_freq->data_ptr<float>();
  const int64_t n_freq = inv_freq->size(0);
  for (int64_t i = 0; i < n_pairs; ++i)
    TORCH_CHECK(rope.fidx[i] >= 0 && rope.fidx[i] < n_freq,
                "mla_cuda: rope_freq_idx holds ", rope.fidx[i],
                ", outside [0, ", n_freq, ")");
  return rope;
}

// Exact softmax attention of one query head (q1: R latent values, q2: rope2
// rope values) over n_keys tokens; key(t) gives token t's latent and rope
// key as a pair of pointers (to the cache's element type or to floats).
// score and acc are scratch; acc holds R floats. Writes the R outputs and
// the log-sum-exp; no keys: zeros and lse = -inf.
template <typename scalar_t, typename Key>
void attend_one_head(const scalar_t* q1, const scalar_t* q2, int64_t n_keys,
                     int64_t R, int64_t rope2, double scale, const Key& key,
                     std::vector<float>& score, std::vector<float>& acc,
                     scalar_t* out, float& lse) {
  score.assign(n_keys, 0.f);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n_keys; ++t) {
    const auto [c, k] = key(t);
    float s = 0.f;
    for (int64_t d = 0; d < R; ++d) s += float(q1[d]) * float(c[d]);
    for (int64_t d = 0; d < rope2; ++d) s += float(q2[d]) * float(k[d]);
    score[t] = s * static_cast<float>(scale);
    m = std::max(m, score[t]);
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  float l = 0.f;
  for (int64_t t = 0; t < n_keys; ++t) {
    const auto c = key(t).first;
    const float p = std::exp(score[t] - m);
    l += p;
    for (int64_t d = 0; d < R; ++d) acc[d] += p * float(c[d]);
  }
  const float inv_l = l > 0.f ? 1.f / l : 0.f;
  for (int64_t d = 0; d < R; ++d)
    out[d] = static_cast<scalar_t>(acc[d] * inv_l);
  lse = l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
}

}  // namespace mla_cuda
