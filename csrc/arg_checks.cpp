// Shape, dtype, device and layout checks shared by the CPU and CUDA kernels.
// Every failure is a c10::Error, which Python sees as RuntimeError with the
// message below; nothing here reads tensor data.
#include "ops.h"
#include "quantized_format.h"

namespace mla_cuda {
namespace {

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16,
              "mla_cuda: ", name, " must be float32, float16 or bfloat16, got ",
              d);
}

void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                       const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "mla_cuda: ", an, " is on ",
              a.device(), " but ", bn, " is on ", b.device(),
              "; move them to one device");
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name,
               const char* shape) {
  TORCH_CHECK(t.dim() == dim, "mla_cuda: ", name, " must be ", dim, "-D ",
              shape, ", got shape ", t.sizes());
}

void check_index_dtype(const at::Tensor& t, at::ScalarType want,
                       const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "mla_cuda: ", name, " must be ", want,
              ", got ", t.scalar_type());
}

void check_rope_tables(const at::Tensor& positions,
                       const at::Tensor& rope_freq_idx,
                       const at::Tensor& inv_freq, const at::Tensor& ref,
                       int64_t T, int64_t n_kv, int64_t r) {
  check_dim(positions, 1, "positions", "[T]");
  check_index_dtype(positions, at::kLong, "positions");
  TORCH_CHECK(positions.size(0) == T, "mla_cuda: positions has ",
              positions.size(0), " entries for ", T, " tokens");
  check_dim(rope_freq_idx, 2, "rope_freq_idx", "[n_kv, r]");
  check_index_dtype(rope_freq_idx, at::kLong, "rope_freq_idx");
  TORCH_CHECK(rope_freq_idx.size(0) == n_kv && rope_freq_idx.size(1) == r,
              "mla_cuda: rope_freq_idx must be [n_kv=", n_kv, ", r=", r,
              "], got ", rope_freq_idx.sizes());
  check_dim(inv_freq, 1, "inv_freq", "[d_h/2]");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat,
              "mla_cuda: inv_freq must be float32, got ",
              inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.size(0) > 0, "mla_cuda: inv_freq is empty");
  for (const auto* t : {&positions, &rope_freq_idx, &inv_freq}) {
    TORCH_CHECK(t->is_contiguous(),
                "mla_cuda: positions, rope_freq_idx and inv_freq must be "
                "contiguous");
    check_same_device(*t, "a rope table", ref, "the tensors it rotates");
  }
}

// The token checks both appends share, after the cache's own: the slot
// dtype, one device, and c_kv, k_rope and slot_mapping agreeing on T.
void check_append_tokens(const at::Tensor& c_kv, const at::Tensor& k_rope,
                         const at::Tensor& latent_cache,
                         const at::Tensor& slot_mapping) {
  check_index_dtype(slot_mapping, at::kLong, "slot_mapping");
  check_same_device(c_kv, "c_kv", latent_cache, "latent_cache");
  check_same_device(k_rope, "k_rope", latent_cache, "latent_cache");
  check_same_device(slot_mapping, "slot_mapping", latent_cache, "latent_cache");
  const int64_t T = c_kv.size(0);
  const int64_t rope2 = k_rope.size(2);
  TORCH_CHECK(k_rope.size(0) == T && slot_mapping.size(0) == T,
              "mla_cuda: c_kv, k_rope and slot_mapping disagree on the number "
              "of tokens: ", T, ", ", k_rope.size(0), ", ",
              slot_mapping.size(0));
  TORCH_CHECK(rope2 % 2 == 0, "mla_cuda: the rope width 2r of k_rope must be "
              "even, got ", rope2);
}

// The layout checks both appends share, once the row width is known: the
// kernels index rows, slots and rope keys densely; RoPE tables all or none.
void check_append_layout(const at::Tensor& c_kv, const at::Tensor& k_rope,
                         const at::Tensor& latent_cache,
                         const at::Tensor& slot_mapping,
                         const c10::optional<at::Tensor>& positions,
                         const c10::optional<at::Tensor>& rope_freq_idx,
                         const c10::optional<at::Tensor>& inv_freq) {
  const int64_t T = c_kv.size(0), R = c_kv.size(1);
  const int64_t n_kv = k_rope.size(1), rope2 = k_rope.size(2);
  TORCH_CHECK(latent_cache.is_contiguous(),
              "mla_cuda: latent_cache must be contiguous");
  TORCH_CHECK(slot_mapping.is_contiguous(),
              "mla_cuda: slot_mapping must be contiguous");
  TORCH_CHECK(c_kv.stride(1) == 1 || R <= 1,
              "mla_cuda: c_kv rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK((k_rope.stride(2) == 1 || rope2 <= 1) &&
                  k_rope.stride(1) == rope2,
              "mla_cuda: k_rope must have contiguous [n_kv, 2r] rows per token");
  const int n_tables = positions.has_value() + rope_freq_idx.has_value() +
                       inv_freq.has_value();
  TORCH_CHECK(n_tables == 0 || n_tables == 3,
              "mla_cuda: give all of positions, rope_freq_idx and inv_freq "
              "(fused RoPE) or none of them");
  if (n_tables == 3)
    check_rope_tables(*positions, *rope_freq_idx, *inv_freq, latent_cache, T,
                      n_kv, rope2 / 2);
}

// The query checks both attentions share, after the cache's dtype: index
// dtypes, one device, dense inputs and q_rope matching q_latent.
void check_attention_queries(const at::Tensor& q_latent,
                             const at::Tensor& q_rope,
                             const at::Tensor& latent_cache,
                             const at::Tensor& block_table,
                             const at::Tensor& seq_lens) {
  check_index_dtype(block_table, at::kInt, "block_table");
  check_index_dtype(seq_lens, at::kInt, "seq_lens");
  for (const auto& [t, name] :
       {std::pair{&q_latent, "q_latent"}, {&q_rope, "q_rope"},
        {&block_table, "block_table"}, {&seq_lens, "seq_lens"}}) {
    check_same_device(*t, name, latent_cache, "latent_cache");
    TORCH_CHECK(t->is_contiguous(), "mla_cuda: ", name,
                " must be contiguous (call .contiguous())");
  }
  TORCH_CHECK(latent_cache.is_contiguous(),
              "mla_cuda: latent_cache must be contiguous");
  const int64_t B = q_latent.size(0), Q = q_latent.size(1);
  const int64_t n_h = q_latent.size(2);
  const int64_t rope2 = q_rope.size(3);
  TORCH_CHECK(q_rope.size(0) == B && q_rope.size(1) == Q &&
                  q_rope.size(2) == n_h,
              "mla_cuda: q_rope ", q_rope.sizes(),
              " does not match q_latent ", q_latent.sizes(),
              " in [B, Q, n_h]");
  TORCH_CHECK(rope2 > 0 && rope2 % 2 == 0,
              "mla_cuda: the rope width 2r must be even and positive, got ",
              rope2);
  TORCH_CHECK(Q >= 1, "mla_cuda: q_latent needs at least one query token");
}

}  // namespace

void check_append_args(const at::Tensor& c_kv, const at::Tensor& k_rope,
                       const at::Tensor& latent_cache,
                       const at::Tensor& slot_mapping,
                       const c10::optional<at::Tensor>& positions,
                       const c10::optional<at::Tensor>& rope_freq_idx,
                       const c10::optional<at::Tensor>& inv_freq) {
  check_dim(c_kv, 2, "c_kv", "[T, R]");
  check_dim(k_rope, 3, "k_rope", "[T, n_kv, 2r]");
  check_dim(latent_cache, 3, "latent_cache",
            "[num_blocks, block_size, R + n_kv*2r]");
  check_dim(slot_mapping, 1, "slot_mapping", "[T]");
  check_float_dtype(latent_cache, "latent_cache");
  TORCH_CHECK(c_kv.scalar_type() == latent_cache.scalar_type() &&
                  k_rope.scalar_type() == latent_cache.scalar_type(),
              "mla_cuda: c_kv (", c_kv.scalar_type(), ") and k_rope (",
              k_rope.scalar_type(), ") must have the cache dtype (",
              latent_cache.scalar_type(), ")");
  check_append_tokens(c_kv, k_rope, latent_cache, slot_mapping);
  const int64_t R = c_kv.size(1);
  const int64_t n_kv = k_rope.size(1), rope2 = k_rope.size(2);
  TORCH_CHECK(latent_cache.size(2) == R + n_kv * rope2,
              "mla_cuda: latent_cache rows hold ", latent_cache.size(2),
              " values but R + n_kv*2r = ", R, " + ", n_kv, "*", rope2, " = ",
              R + n_kv * rope2);
  check_append_layout(c_kv, k_rope, latent_cache, slot_mapping, positions,
                      rope_freq_idx, inv_freq);
}

void check_rope_args(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& positions,
                     const at::Tensor& rope_freq_idx,
                     const at::Tensor& inv_freq) {
  check_dim(q, 3, "q", "[T, n_h, 2r]");
  check_dim(k, 3, "k", "[T, n_kv, 2r]");
  check_float_dtype(q, "q");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "mla_cuda: q (",
              q.scalar_type(), ") and k (", k.scalar_type(),
              ") must share a dtype");
  check_same_device(q, "q", k, "k");
  const int64_t T = q.size(0), n_h = q.size(1), rope2 = q.size(2);
  const int64_t n_kv = k.size(1);
  TORCH_CHECK(k.size(0) == T, "mla_cuda: q has ", T, " tokens, k has ",
              k.size(0));
  TORCH_CHECK(k.size(2) == rope2, "mla_cuda: q and k rope widths differ: ",
              rope2, " vs ", k.size(2));
  TORCH_CHECK(rope2 % 2 == 0 && rope2 > 0,
              "mla_cuda: the rope width 2r must be even and positive, got ",
              rope2);
  TORCH_CHECK(n_kv > 0 && n_h % n_kv == 0, "mla_cuda: n_h=", n_h,
              " query heads must be a multiple of n_kv=", n_kv, " KV heads");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1,
              "mla_cuda: the last (rope) dim of q and k must be contiguous");
  check_rope_tables(positions, rope_freq_idx, inv_freq, q, T, n_kv, rope2 / 2);
}

void check_attention_args(const at::Tensor& q_latent, const at::Tensor& q_rope,
                          const at::Tensor& latent_cache,
                          const at::Tensor& block_table,
                          const at::Tensor& seq_lens) {
  check_dim(q_latent, 4, "q_latent", "[B, Q, n_h, R]");
  check_dim(q_rope, 4, "q_rope", "[B, Q, n_h, 2r]");
  check_dim(latent_cache, 3, "latent_cache",
            "[num_blocks, block_size, R + n_kv*2r]");
  check_dim(block_table, 2, "block_table", "[B, max_blocks]");
  check_dim(seq_lens, 1, "seq_lens", "[B]");
  check_float_dtype(latent_cache, "latent_cache");
  TORCH_CHECK(q_latent.scalar_type() == latent_cache.scalar_type() &&
                  q_rope.scalar_type() == latent_cache.scalar_type(),
              "mla_cuda: q_latent (", q_latent.scalar_type(), ") and q_rope (",
              q_rope.scalar_type(), ") must have the cache dtype (",
              latent_cache.scalar_type(), ")");
  check_attention_queries(q_latent, q_rope, latent_cache, block_table,
                          seq_lens);
  const int64_t B = q_latent.size(0);
  const int64_t n_h = q_latent.size(2), R = q_latent.size(3);
  const int64_t rope2 = q_rope.size(3);
  const int64_t D = latent_cache.size(2);
  TORCH_CHECK(D > R && (D - R) % rope2 == 0,
              "mla_cuda: latent_cache rows of width ", D,
              " do not split into R=", R, " plus whole rope keys of width ",
              rope2);
  const int64_t n_kv = (D - R) / rope2;
  TORCH_CHECK(n_h % n_kv == 0, "mla_cuda: n_h=", n_h,
              " query heads must be a multiple of the cache's n_kv=", n_kv);
  TORCH_CHECK(block_table.size(0) == B && seq_lens.size(0) == B,
              "mla_cuda: block_table and seq_lens must have B=", B,
              " rows, got ", block_table.size(0), " and ", seq_lens.size(0));
  TORCH_CHECK(latent_cache.size(1) > 0, "mla_cuda: block_size must be > 0");
}

// ---- quantized caches (uint8 rows, csrc/quantized_format.h) ----------------
namespace {

void check_byte_cache(const at::Tensor& latent_cache) {
  check_dim(latent_cache, 3, "latent_cache",
            "[num_blocks, block_size, row_bytes] (a quantized cache)");
  TORCH_CHECK(latent_cache.scalar_type() == at::kByte,
              "mla_cuda: a quantized latent_cache must be uint8 (its rows are "
              "bytes), got ", latent_cache.scalar_type(),
              "; allocate it with mla_cuda.PagedLatentCache(cache_format=...)");
  TORCH_CHECK(latent_cache.is_contiguous(),
              "mla_cuda: latent_cache must be contiguous");
  TORCH_CHECK(latent_cache.size(1) > 0, "mla_cuda: block_size must be > 0");
}

void check_row_bytes(const at::Tensor& latent_cache, const QuantLayout& l,
                     const std::string& cache_format, int64_t n_kv,
                     int64_t rope2) {
  TORCH_CHECK(latent_cache.size(2) == l.row_bytes, "mla_cuda: a \"",
              cache_format, "\" cache row for R=", l.R, " and ", n_kv,
              " rope key(s) of width ", rope2, " is ", l.row_bytes,
              " bytes, but latent_cache rows are ", latent_cache.size(2));
}

}  // namespace

QuantLayout check_append_quantized_args(
    const at::Tensor& c_kv, const at::Tensor& k_rope,
    const at::Tensor& latent_cache, const at::Tensor& slot_mapping,
    const std::string& cache_format, const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq) {
  check_dim(c_kv, 2, "c_kv", "[T, R]");
  check_dim(k_rope, 3, "k_rope", "[T, n_kv, 2r]");
  check_dim(slot_mapping, 1, "slot_mapping", "[T]");
  check_byte_cache(latent_cache);
  check_float_dtype(c_kv, "c_kv");
  TORCH_CHECK(k_rope.scalar_type() == c_kv.scalar_type(), "mla_cuda: k_rope (",
              k_rope.scalar_type(), ") must have c_kv's dtype (",
              c_kv.scalar_type(), "), which the cache stores its rope keys in");
  check_append_tokens(c_kv, k_rope, latent_cache, slot_mapping);
  const int64_t R = c_kv.size(1);
  const int64_t n_kv = k_rope.size(1), rope2 = k_rope.size(2);
  const QuantLayout l =
      quant_layout(cache_format, R, n_kv * rope2 * c_kv.element_size());
  check_row_bytes(latent_cache, l, cache_format, n_kv, rope2);
  // (check_byte_cache has required latent_cache contiguous already)
  check_append_layout(c_kv, k_rope, latent_cache, slot_mapping, positions,
                      rope_freq_idx, inv_freq);
  return l;
}

QuantLayout check_attention_quantized_args(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const std::string& cache_format,
    int64_t kv_heads) {
  check_dim(q_latent, 4, "q_latent", "[B, Q, n_h, R]");
  check_dim(q_rope, 4, "q_rope", "[B, Q, n_h, 2r]");
  check_byte_cache(latent_cache);
  check_dim(block_table, 2, "block_table", "[B, max_blocks]");
  check_dim(seq_lens, 1, "seq_lens", "[B]");
  check_float_dtype(q_latent, "q_latent");
  TORCH_CHECK(q_rope.scalar_type() == q_latent.scalar_type(),
              "mla_cuda: q_rope (", q_rope.scalar_type(),
              ") must have q_latent's dtype (", q_latent.scalar_type(),
              "), which the cache stores its rope keys in");
  // (check_byte_cache has required latent_cache contiguous already)
  check_attention_queries(q_latent, q_rope, latent_cache, block_table,
                          seq_lens);
  const int64_t B = q_latent.size(0);
  const int64_t n_h = q_latent.size(2), R = q_latent.size(3);
  const int64_t rope2 = q_rope.size(3);
  TORCH_CHECK(kv_heads > 0 && n_h % kv_heads == 0, "mla_cuda: n_h=", n_h,
              " query heads must be a multiple of kv_heads=", kv_heads);
  const QuantLayout l = quant_layout(
      cache_format, R, kv_heads * rope2 * q_latent.element_size());
  check_row_bytes(latent_cache, l, cache_format, kv_heads, rope2);
  TORCH_CHECK(block_table.size(0) == B && seq_lens.size(0) == B,
              "mla_cuda: block_table and seq_lens must have B=", B,
              " rows, got ", block_table.size(0), " and ", seq_lens.size(0));
  return l;
}

}  // namespace mla_cuda
