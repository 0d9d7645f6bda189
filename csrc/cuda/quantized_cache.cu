// The quantized latent cache on the GPU (docs/ops.md, "Quantized caches"):
// the append that quantizes each token's latent as it writes the row, and
// absorbed attention that reads each row once and dequantizes it on chip
// (on Hopper, for more than 16 query rows, the wgmma kernel of
// mla_attention.cu; else the kernels here, in registers). Row layout and
// code maps: csrc/quantized_format.h, the same functions the CPU reference
// uses, so both write the same bytes.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../ops.h"
#include "common.cuh"
#include "mla_decode_quant.cuh"
#include "split_combine.cuh"

namespace mla_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

__device__ __forceinline__ float warp_abs_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_abs_max(__shfl_xor_sync(0xffffffffu, v, o), v);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- append ------------------------------------------------------------------
// One warp per token: the group scales first (a warp reduction each), then
// the codes in 16-byte chunks (one vector store per lane and chunk), the
// rope keys (rotated when tables are given), and zeros in the row's pad.
template <typename T>
__global__ void append_quantized_kernel(
    const T* __restrict__ c_kv, int64_t c_stride, const T* __restrict__ k_rope,
    int64_t k_stride, uint8_t* __restrict__ cache,
    const int64_t* __restrict__ slots, int64_t num_slots, int num_tokens,
    QuantLayout l, int n_kv, int r, bool vector_stores,
    const int64_t* __restrict__ positions, const int64_t* __restrict__ freq_idx,
    const float* __restrict__ inv_freq, int n_freq) {
  extern __shared__ float inv_scales[];  // [kWarps][num_scales]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= num_tokens) return;
  const int64_t slot = slots[t];
  // Negative slots are padding; out-of-range ones (rejected by the Python
  // wrapper before launch) are skipped rather than written out of bounds.
  if (slot < 0 || slot >= num_slots) return;
  uint8_t* row = cache + slot * l.row_bytes;
  const T* c = c_kv + t * c_stride;
  float* inv = inv_scales + warp * l.num_scales;
  for (int64_t s = 0; s < l.num_scales; ++s) {
    float amax = 0.f;
    for (int64_t d = s * l.group + lane; d < (s + 1) * l.group; d += 32)
      amax = nan_abs_max(to_float(c[d]), amax);
    amax = warp_abs_max(amax);
    if (lane == 0) {
      reinterpret_cast<float*>(row + l.scale_offset)[s] = quant_scale(l.kind, amax);
      inv[s] = quant_inv_scale(l.kind, amax);
    }
  }
  __syncwarp();
  const int64_t chunks = (l.scale_offset + 15) / 16;  // codes and the gap before the scales
  for (int64_t j = lane; j < chunks; j += 32) {
    alignas(16) uint8_t bytes[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int64_t byte = 16 * j + k;
      uint8_t v = 0;
      if (byte < l.code_bytes) {
        if (l.kind == QuantKind::kFp8) {
          v = fp8_code(to_float(c[byte]), inv[byte / l.group]);
        } else {
          const int64_t d = 2 * byte;
          v = static_cast<uint8_t>((int4_code(to_float(c[d]), inv[d / l.group]) & 0xF) |
                                   ((int4_code(to_float(c[d + 1]), inv[(d + 1) / l.group]) & 0xF) << 4));
        }
      }
      bytes[k] = v;
    }
    if (vector_stores && 16 * j + 16 <= l.scale_offset) {
      reinterpret_cast<uint4*>(row)[j] = *reinterpret_cast<const uint4*>(bytes);
    } else {
      for (int k = 0; k < 16 && 16 * j + k < l.scale_offset; ++k) row[16 * j + k] = bytes[k];
    }
  }
  T* rope = reinterpret_cast<T*>(row + l.rope_offset);
  for (int gj = lane; gj < n_kv * r; gj += 32) {
    const int g = gj / r, j = gj - g * r;
    const T* k = k_rope + t * k_stride + g * 2 * r;
    const float x1 = to_float(k[j]), x2 = to_float(k[j + r]);
    float y1 = x1, y2 = x2;
    if (positions != nullptr) {
      float co, si;
      rope_cos_sin(positions[t], freq_idx[gj], inv_freq, n_freq, co, si);
      rotate_pair(x1, x2, co, si, y1, y2);
    }
    rope[g * 2 * r + j] = from_float<T>(y1);
    rope[g * 2 * r + j + r] = from_float<T>(y2);
  }
  for (int64_t b = l.rope_offset + l.rope_bytes + lane; b < l.row_bytes; b += 32) row[b] = 0;
}

// ---- attention -------------------------------------------------------------
// One CTA per (sequence and query, KV head, chunk of that head's query
// heads): it streams the sequence's rows in tiles of kTile tokens, each row
// read from global memory once (16-byte loads into shared memory, raw
// bytes), and every query head of the chunk dequantizes the codes it needs
// in registers. Warp w owns query heads w, w + kWarps, ...: for each tile a
// lane scores one token, the warp updates the online softmax, then lanes
// split the latent channels to accumulate p * c. Long sequences are split
// over CTAs and merged by the combine kernel (split_combine.cuh). It
// dequantizes with scalar FMAs, not tensor cores: the correct,
// graph-capturable path, not yet a bandwidth-bound one.
constexpr int kTile = 32;
constexpr int kMaxHeads = 32;                       // query heads a CTA
constexpr int kSlots = (kMaxHeads + kWarps - 1) / kWarps;  // of them a warp

struct AttnSmem {
  int heads, R, rope2, row_words;
  // float offsets into dynamic shared memory
  __host__ __device__ int q() const { return 0; }
  __host__ __device__ int q_rope() const { return heads * R; }
  __host__ __device__ int acc() const { return heads * (R + rope2); }
  __host__ __device__ int p() const { return heads * (2 * R + rope2); }
  __host__ __device__ int tile() const { return heads * (2 * R + rope2 + kTile); }
  // a row's words are padded by one so lanes reading one word each of
  // different rows hit different banks
  __host__ __device__ int row_stride() const { return row_words + 1; }
  __host__ __device__ size_t bytes() const {
    return sizeof(float) * (static_cast<size_t>(tile()) + static_cast<size_t>(kTile) * row_stride());
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_quantized_kernel(
    const T* __restrict__ q_latent, const T* __restrict__ q_rope,
    const uint8_t* __restrict__ cache, const int* __restrict__ block_table,
    const int* __restrict__ seq_lens, T* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ part_out, float* __restrict__ part_lse, int num_splits,
    QuantLayout l, AttnSmem sm, int Q, int n_h, int group, int block_size,
    int num_blocks, int max_blocks, float scale_log2) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int R = sm.R, rope2 = sm.rope2;
  const int bq = blockIdx.z, b = bq / Q, i = bq - b * Q, g = blockIdx.y;
  const int chunk = blockIdx.x / num_splits, split = blockIdx.x - chunk * num_splits;
  const int h0 = g * group + chunk * sm.heads;
  const int heads = min(sm.heads, g * group + group - h0);
  float* qs = smem + sm.q();
  float* qr = smem + sm.q_rope();
  float* acc = smem + sm.acc();
  float* ps = smem + sm.p();
  uint32_t* tile = reinterpret_cast<uint32_t*>(smem + sm.tile());
  const T* q1 = q_latent + (static_cast<int64_t>(bq) * n_h + h0) * R;
  const T* q2 = q_rope + (static_cast<int64_t>(bq) * n_h + h0) * rope2;
  for (int k = threadIdx.x; k < heads * R; k += kThreads) {
    qs[k] = to_float(q1[k]);
    acc[k] = 0.f;
  }
  for (int k = threadIdx.x; k < heads * rope2; k += kThreads) qr[k] = to_float(q2[k]);
  const int len = seq_lens[b];
  int n_keys = len <= 0 ? 0 : len - Q + i + 1;
  n_keys = max(0, min(n_keys, max_blocks * block_size));  // in bounds whatever seq_lens holds
  // This split's keys: whole tiles of the row's keys.
  const int split_len = ((n_keys + num_splits - 1) / num_splits + kTile - 1) / kTile * kTile;
  const int k_begin = min(n_keys, split * split_len);
  const int k_end = min(n_keys, k_begin + split_len);
  const int row_chunks = static_cast<int>(l.row_bytes / 16);
  const int code_words = static_cast<int>((l.code_bytes + 3) / 4);
  const int scale_word = static_cast<int>(l.scale_offset / 4);
  const int per_word = l.kind == QuantKind::kFp8 ? 4 : 8;
  const int grp = static_cast<int>(l.group);
  const bool grouped = l.group < l.R;  // values rounded to T (quant_attention_value), else exact codes x scale
  const int rope_byte = static_cast<int>(l.rope_offset) + g * rope2 * static_cast<int>(sizeof(T));
  float m_run[kSlots];  // per owned head: running max (log2 units) and sum
  float l_run[kSlots];
  for (int k = 0; k < kSlots; ++k) {
    m_run[k] = -std::numeric_limits<float>::infinity();
    l_run[k] = 0.f;
  }
  for (int start = k_begin; start < k_end; start += kTile) {
    const int ntok = min(kTile, k_end - start);
    __syncthreads();  // the previous tile is read by every warp (and q is loaded)
    for (int k = threadIdx.x; k < ntok * row_chunks; k += kThreads) {
      const int t = k / row_chunks, c = k - t * row_chunks, pos = start + t;
      const int blk = block_table[static_cast<int64_t>(b) * max_blocks + pos / block_size];
      uint4 v;
      if (blk < 0 || blk >= num_blocks) {  // rejected on the host unless validate=False: NaN, never out of bounds
        v = make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);  // NaN codes, scales, rope
      } else {
        v = reinterpret_cast<const uint4*>(
            cache + (static_cast<int64_t>(blk) * block_size + pos % block_size) * l.row_bytes)[c];
      }
      uint32_t* dst = tile + t * sm.row_stride() + 4 * c;
      dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    }
    __syncthreads();
    for (int hh = warp, slot = 0; hh < heads; hh += kWarps, ++slot) {
      // scores: lane = token of the tile
      float s = -std::numeric_limits<float>::infinity();
      if (lane < ntok) {
        const uint32_t* row = tile + lane * sm.row_stride();
        const float* scales = reinterpret_cast<const float*>(row + scale_word);
        const float* q = qs + hh * R;
        float dot = 0.f;
        for (int w = 0; w < code_words; ++w) {
          const uint32_t word = row[w];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (e >= per_word) break;
            const int d = w * per_word + e;
            if (d >= R) break;
            const float v = l.kind == QuantKind::kFp8
                                ? fp8_value(static_cast<uint8_t>(word >> (8 * e)))
                                : int4_value(static_cast<uint8_t>(word >> (4 * (e & ~1))), e);
            dot += grouped ? q[d] * quant_attention_value<T>(v * scales[d / grp], l) : q[d] * v * scales[d / grp];
          }
        }
        const T* rk = reinterpret_cast<const T*>(reinterpret_cast<const uint8_t*>(row) + rope_byte);
        const float* qrh = qr + hh * rope2;
        for (int d = 0; d < rope2; ++d) dot += qrh[d] * to_float(rk[d]);
        s = dot * scale_log2;
      }
      const float m_new = fmaxf(m_run[slot], warp_max(s));
      const float alpha = exp2f(m_run[slot] - m_new);  // 0 on the first tile (m_run = -inf)
      const float p = lane < ntok ? exp2f(s - m_new) : 0.f;
      l_run[slot] = l_run[slot] * alpha + warp_sum(p);
      m_run[slot] = m_new;
      ps[hh * kTile + lane] = p;
      __syncwarp();
      // accumulate: lanes split the code words of the latent
      float* a = acc + hh * R;
      for (int w = lane; w < code_words; w += 32) {
        float part[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) part[e] = 0.f;
        for (int t = 0; t < ntok; ++t) {
          const uint32_t* row = tile + t * sm.row_stride();
          const float* scales = reinterpret_cast<const float*>(row + scale_word);
          const float pt = ps[hh * kTile + t];
          const uint32_t word = row[w];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (e >= per_word) break;
            const int d = w * per_word + e;
            if (d >= R) break;
            const float v = l.kind == QuantKind::kFp8
                                ? fp8_value(static_cast<uint8_t>(word >> (8 * e)))
                                : int4_value(static_cast<uint8_t>(word >> (4 * (e & ~1))), e);
            part[e] += grouped ? pt * quant_attention_value<T>(v * scales[d / grp], l) : pt * v * scales[d / grp];
          }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int d = w * per_word + e;
          if (e < per_word && d < R) a[d] = a[d] * alpha + part[e];
        }
      }
      __syncwarp();
    }
  }
  __syncwarp();
  // One split: the output and lse. Several: this split's normalized output
  // and lse, rows m = i * n_h + h of sequence b, for the combine kernel.
  const int M = Q * n_h;
  for (int hh = warp, slot = 0; hh < heads; hh += kWarps, ++slot) {
    const float lsum = l_run[slot];
    const float inv_l = lsum > 0.f ? 1.f / lsum : 0.f;  // no key: zeros, lse = -inf
    const float v_lse = row_lse(m_run[slot], lsum);
    const int64_t idx = static_cast<int64_t>(bq) * n_h + h0 + hh;
    if (num_splits == 1) {
      for (int d = lane; d < R; d += 32) out[idx * R + d] = from_float<T>(acc[hh * R + d] * inv_l);
      if (lane == 0) lse[idx] = v_lse;
    } else {
      const int64_t row = (static_cast<int64_t>(b) * num_splits + split) * M + i * n_h + h0 + hh;
      for (int d = lane; d < R; d += 32) part_out[row * R + d] = acc[hh * R + d] * inv_l;
      if (lane == 0) part_lse[row] = v_lse;
    }
  }
}

// ---- the tensor-core path (mla_decode_quant.cuh) ---------------------------
// One configuration: 8 warps, 2-stage rings, R <= 96 (6 k steps, 12 output
// tiles), rope parts of up to 32 values, rows of up to 192 bytes: the
// quantized rows of SmolLM2-size latents (d_kv = 16, 32 at 3 KV heads).
constexpr int kQWarps = 8, kQStages = 2, kQKL = 6, kQKR = 2, kQKN = 12, kQKC = 6;

size_t quant_decode_smem(const quant_decode::Shape& s) {
  const size_t rings = static_cast<size_t>(kQWarps) * kQStages * 16 * s.stride_bytes;
  const size_t merge = sizeof(float) * (static_cast<size_t>(kQWarps) * 16 * 2 + 16 * 2 +
                                        static_cast<size_t>(kQWarps) * 16 * s.R);
  return std::max(rings, merge);
}

// Runs the tensor-core kernel when it holds the call: 16-bit queries on
// sm_80+, one scale per token or per group of a multiple of 4 channels, R a
// multiple of 16 up to 96, a rope part of
// up to 32 values, block sizes that are multiples of 16. false leaves the
// call to the scalar kernel above.
bool try_quant_decode(const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                      const QuantLayout& l, int64_t kv_heads, at::Tensor& out, at::Tensor& lse) {
  const auto dtype = q_latent.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  quant_decode::Shape s{};
  s.B = q_latent.size(0);
  s.Q = q_latent.size(1);
  s.n_h = q_latent.size(2);
  s.R = q_latent.size(3);
  s.rope2 = q_rope.size(3);
  s.n_kv = static_cast<int>(kv_heads);
  s.rope_total = s.n_kv * s.rope2;
  s.block_size = cache.size(1);
  s.max_blocks = block_table.size(1);
  s.num_blocks = cache.size(0);
  s.M = s.Q * s.n_h;
  s.row_bytes = static_cast<int>(l.row_bytes);
  // An even number of 16-byte chunks per row would put rows 4 apart on the
  // same banks: skew by one chunk.
  s.stride_bytes = s.row_bytes + ((s.row_bytes / 16) % 2 == 0 ? 16 : 0);
  s.scale_offset = static_cast<int>(l.scale_offset);
  s.rope_offset = static_cast<int>(l.rope_offset);
  s.group = static_cast<int>(l.group);
  s.kl = s.R / 16;
  s.kr = (s.rope_total + 15) / 16;
  s.kn = s.R / 8;
  s.scale_log2 = static_cast<float>(scale) * kLog2e;
  const bool grouped = l.group < l.R;
  if ((grouped && l.group % 4 != 0) || s.R % 16 != 0 || s.kl > kQKL || s.kn > kQKN || s.kr > kQKR || s.block_size % 16 != 0 ||
      s.row_bytes > 32 * kQKC || reinterpret_cast<uintptr_t>(q_latent.data_ptr()) % 4 != 0)
    return false;
  int major = 0, num_sms = 0, smem_optin = 0;
  const int device = q_latent.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t smem = quant_decode_smem(s);
  if (major < 8 || smem > static_cast<size_t>(smem_optin)) return false;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto tag, auto kind_tag, auto grouped_tag) {
    using T = decltype(tag);
    constexpr QuantKind K = decltype(kind_tag)::value;
    auto kernel =
        quant_decode::mla_decode_quant_kernel<T, K, decltype(grouped_tag)::value, kQWarps, kQStages, kQKL, kQKR,
                                              kQKN, kQKC>;
    const int per_sm = prepare_kernel(kernel, 32 * kQWarps, smem);
    const int m_tiles = (s.M + 15) / 16;
    // A split gives every warp of its block at least one tile.
    s.num_splits = choose_num_splits(m_tiles * s.B, num_sms * std::max(per_sm, 1), s.max_blocks * s.block_size,
                                     16 * kQWarps);
    const SplitParts parts = split_parts(s.B, s.num_splits, s.M, s.R, q_latent);
    kernel<<<dim3(m_tiles, s.num_splits, s.B), 32 * kQWarps, smem, stream>>>(
        static_cast<const T*>(q_latent.data_ptr()), static_cast<const T*>(q_rope.data_ptr()),
        cache.data_ptr<uint8_t>(), block_table.data_ptr<int>(), seq_lens.data_ptr<int>(),
        static_cast<T*>(out.data_ptr()), lse.data_ptr<float>(), parts.out_ptr(), parts.lse_ptr(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_splits<T>(parts, out, lse, s.B, s.M, s.R, s.num_splits, stream);
  };
  auto by_grouping = [&](auto tag, auto kind_tag) {
    if (grouped) run(tag, kind_tag, std::true_type{});
    else run(tag, kind_tag, std::false_type{});
  };
  auto by_kind = [&](auto tag) {
    if (l.kind == QuantKind::kFp8) by_grouping(tag, std::integral_constant<QuantKind, QuantKind::kFp8>{});
    else by_grouping(tag, std::integral_constant<QuantKind, QuantKind::kInt4>{});
  };
  if (dtype == at::kHalf) by_kind(c10::Half{});
  else by_kind(c10::BFloat16{});
  return true;
}

}  // namespace

void latent_cache_append_quantized_cuda(
    const at::Tensor& c_kv, const at::Tensor& k_rope, at::Tensor& latent_cache,
    const at::Tensor& slot_mapping, const std::string& cache_format,
    const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq) {
  const QuantLayout l = check_append_quantized_args(
      c_kv, k_rope, latent_cache, slot_mapping, cache_format, positions,
      rope_freq_idx, inv_freq);
  const int T = c_kv.size(0);
  if (T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(latent_cache.device());
  const int n_kv = k_rope.size(1), r = k_rope.size(2) / 2;
  const int64_t num_slots = latent_cache.size(0) * latent_cache.size(1);
  const bool fused = positions.has_value();
  const size_t smem = sizeof(float) * kWarps * l.num_scales;
  TORCH_CHECK(smem <= 48 * 1024, "mla_cuda: cache_format \"", cache_format,
              "\" has ", l.num_scales, " scales a row; use larger groups");
  const dim3 grid((T + kWarps - 1) / kWarps), block(kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // scales and rope keys are stored as 4- and 2-byte words
  TORCH_CHECK(reinterpret_cast<uintptr_t>(latent_cache.data_ptr()) % 4 == 0,
              "mla_cuda: a quantized latent_cache must start on a 4-byte "
              "boundary (allocate it whole, not as an offset view)");
  const bool vector_stores = is_aligned16(latent_cache.data_ptr());
  MLA_DISPATCH_FLOAT_TYPES(c_kv.scalar_type(), "append_quantized_cuda", [&] {
    append_quantized_kernel<scalar_t><<<grid, block, smem, stream>>>(
        c_kv.data_ptr<scalar_t>(), c_kv.stride(0), k_rope.data_ptr<scalar_t>(),
        k_rope.stride(0), latent_cache.data_ptr<uint8_t>(),
        slot_mapping.data_ptr<int64_t>(), num_slots, T, l, n_kv, r, vector_stores,
        fused ? positions->data_ptr<int64_t>() : nullptr,
        fused ? rope_freq_idx->data_ptr<int64_t>() : nullptr,
        fused ? inv_freq->data_ptr<float>() : nullptr,
        fused ? static_cast<int>(inv_freq->size(0)) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> mla_attention_quantized_cuda(
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
  // The grid's z dimension holds the sequence x query rows, at most 65535: a
  // larger call (a chunked prefill of a big batch through the cache) runs in
  // slices of whole sequences, each a call of its own.
  constexpr int64_t kMaxGridZ = 65535;
  TORCH_CHECK(Q <= kMaxGridZ && kv_heads <= kMaxGridZ,
              "mla_cuda: quantized attention takes at most 65535 query rows a "
              "sequence and 65535 KV heads a call");
  if (B * Q > kMaxGridZ) {
    const int64_t per_slice = kMaxGridZ / Q;
    std::vector<at::Tensor> outs, lses;
    for (int64_t b0 = 0; b0 < B; b0 += per_slice) {
      const int64_t b1 = std::min(B, b0 + per_slice);
      auto [o, s] = mla_attention_quantized_cuda(
          q_latent.slice(0, b0, b1), q_rope.slice(0, b0, b1), latent_cache,
          block_table.slice(0, b0, b1), seq_lens.slice(0, b0, b1), scale,
          cache_format, kv_heads);
      outs.push_back(std::move(o));
      lses.push_back(std::move(s));
    }
    return {at::cat(outs), at::cat(lses)};
  }
  at::Tensor out = at::empty_like(q_latent);
  at::Tensor lse = at::empty({B, Q, n_h}, q_latent.options().dtype(at::kFloat));
  if (B == 0 || n_h == 0) return {out, lse};
  TORCH_CHECK(is_aligned16(latent_cache.data_ptr()),
              "mla_cuda: a quantized latent_cache must start on a 16-byte "
              "boundary (allocate it whole, not as an offset view)");
  const c10::cuda::OptionalCUDAGuard guard(latent_cache.device());
  if (mla_attention_quantized_wgmma(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, l, kv_heads,
                                    out, lse) ||
      try_quant_decode(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, l, kv_heads, out, lse))
    return {out, lse};
  // The scalar kernel. Query heads a CTA: the whole group when its queries
  // and accumulators fit beside one tile in the device's shared memory (each
  // row then read once per KV head), fewer otherwise.
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        latent_cache.get_device()));
  const int64_t smem_limit = smem_optin;
  AttnSmem sm{static_cast<int>(std::min<int64_t>(group, kMaxHeads)), static_cast<int>(R),
              static_cast<int>(rope2), static_cast<int>(l.row_bytes / 4)};
  while (sm.heads > 1 && static_cast<int64_t>(sm.bytes()) > smem_limit) --sm.heads;
  TORCH_CHECK(static_cast<int64_t>(sm.bytes()) <= smem_limit,
              "mla_cuda: quantized attention over R=", R,
              " needs more shared memory than the kernel uses; R is too large");
  const int head_chunks = static_cast<int>((group + sm.heads - 1) / sm.heads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, latent_cache.get_device()));
  MLA_DISPATCH_FLOAT_TYPES(q_latent.scalar_type(), "mla_attention_quantized_cuda", [&] {
    auto kernel = attention_quantized_kernel<scalar_t>;
    // Flash-decoding split over the sequence, chosen as for the 16-bit
    // kernels (choose_num_splits), none shorter than a tile. Sizes come from
    // shapes only, so the call stays graph-capturable.
    const int per_sm = prepare_kernel(kernel, kThreads, sm.bytes());
    const int blocks_per_split = static_cast<int>(std::min<int64_t>(
        int64_t(head_chunks) * kv_heads * B * Q, std::numeric_limits<int>::max()));
    const int max_len = static_cast<int>(block_table.size(1) * latent_cache.size(1));
    const int num_splits = choose_num_splits(blocks_per_split, num_sms * std::max(per_sm, 1), max_len, kTile);
    const SplitParts parts = split_parts(B, num_splits, Q * n_h, R, q_latent);
    const dim3 grid(head_chunks * num_splits, kv_heads, B * Q), block(kThreads);
    kernel<<<grid, block, sm.bytes(), stream>>>(
        q_latent.data_ptr<scalar_t>(), q_rope.data_ptr<scalar_t>(),
        latent_cache.data_ptr<uint8_t>(), block_table.data_ptr<int>(),
        seq_lens.data_ptr<int>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
        parts.out_ptr(), parts.lse_ptr(), num_splits, l, sm,
        static_cast<int>(Q), static_cast<int>(n_h), static_cast<int>(group),
        static_cast<int>(latent_cache.size(1)), static_cast<int>(latent_cache.size(0)),
        static_cast<int>(block_table.size(1)), scale_log2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_splits<scalar_t>(parts, out, lse, static_cast<int>(B), static_cast<int>(Q * n_h),
                             static_cast<int>(R), num_splits, stream);
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("latent_cache_append_quantized", &latent_cache_append_quantized_cuda);
  m.impl("mla_attention_quantized", &mla_attention_quantized_cuda);
}

}  // namespace mla_cuda
