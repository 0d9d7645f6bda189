// The whole op surface of mla_cuda: every schema, in one place.
// Backend implementations register themselves in csrc/cpu/*.cpp
// (TORCH_LIBRARY_IMPL(mla_cuda, CPU, m)) and csrc/cuda/*.cu (CUDA); the
// out-of-place partial_rope, the same for both, in csrc/partial_rope.cpp.
// Fake (meta) kernels and autograd formulas live in mla_cuda/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(mla_cuda, m) {
  // Latent-cache append. Writes row [c_kv | rope keys of all KV heads] of
  // every token t into latent_cache.view(-1, D)[slot_mapping[t]].
  //   c_kv [T, R], k_rope [T, n_kv, 2r] (last dim contiguous),
  //   latent_cache [num_blocks, block_size, R + n_kv*2r] (contiguous),
  //   slot_mapping [T] int64, negative = skip (padding).
  // With positions [T] int64, rope_freq_idx [n_kv, r] int64 and
  // inv_freq [d_h/2] float32 the rope keys are rotated on the way in.
  m.def(
      "latent_cache_append(Tensor c_kv, Tensor k_rope, Tensor(a!) latent_cache,"
      " Tensor slot_mapping, Tensor? positions=None, Tensor? rope_freq_idx=None,"
      " Tensor? inv_freq=None) -> ()");

  // Partial RoPE on the rope dims of q [T, n_h, 2r] and k [T, n_kv, 2r]
  // (per head: r first halves, then r second halves; pair (j, j+r) turns by
  // positions[t] * inv_freq[rope_freq_idx[g, j]], g the head's KV head).
  // inverse=True turns by the negative angle (the backward pass).
  m.def(
      "partial_rope(Tensor q, Tensor k, Tensor positions, Tensor rope_freq_idx,"
      " Tensor inv_freq, bool inverse=False) -> (Tensor, Tensor)");
  m.def(
      "partial_rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions,"
      " Tensor rope_freq_idx, Tensor inv_freq, bool inverse=False) -> ()");

  // Absorbed MLA attention over the paged latent cache.
  //   q_latent [B, Q, n_h, R], q_rope [B, Q, n_h, 2r],
  //   latent_cache [num_blocks, block_size, R + n_kv*2r],
  //   block_table [B, max_blocks] int32, seq_lens [B] int32.
  // Query i of sequence b sits at position seq_lens[b] - Q + i and sees keys
  // 0..that position (causal among the Q new tokens; Q = 1 is decode).
  // Returns out_latent [B, Q, n_h, R] (dtype of q) and the natural-log
  // log-sum-exp of the scaled scores [B, Q, n_h] float32.
  // num_splits: 0 chooses the flash-decoding split from batch, length and
  // SM count; a positive value forces it (tests, benchmarks).
  m.def(
      "mla_attention(Tensor q_latent, Tensor q_rope, Tensor latent_cache,"
      " Tensor block_table, Tensor seq_lens, float scale, int num_splits=0)"
      " -> (Tensor, Tensor)");

  // The same two ops over a quantized cache (docs/ops.md, "Quantized
  // caches"): latent_cache is uint8 [num_blocks, block_size, row_bytes], one
  // row per token laid out by cache_format ("fp8", "int4", "<kind>-g<N>"):
  // [latent codes | float32 scales | rope keys in the dtype of c_kv / q |
  // zero pad to 16 bytes] (csrc/quantized_format.h). The append quantizes as
  // it writes; attention dequantizes each row as it reads it.
  // kv_heads: n_kv, the rope keys per row (the row width alone can leave it
  // ambiguous).
  m.def(
      "latent_cache_append_quantized(Tensor c_kv, Tensor k_rope,"
      " Tensor(a!) latent_cache, Tensor slot_mapping, str cache_format,"
      " Tensor? positions=None, Tensor? rope_freq_idx=None,"
      " Tensor? inv_freq=None) -> ()");
  m.def(
      "mla_attention_quantized(Tensor q_latent, Tensor q_rope,"
      " Tensor latent_cache, Tensor block_table, Tensor seq_lens, float scale,"
      " str cache_format, int kv_heads=1) -> (Tensor, Tensor)");
}
