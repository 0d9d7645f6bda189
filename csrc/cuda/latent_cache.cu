// Latent-cache append on the GPU: writes each token's cache row
// [c_kv | rope keys of all KV heads], rotating the rope keys on the way in
// when RoPE tables are given (the fused variant).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "common.cuh"

namespace mla_cuda {
namespace {

constexpr int kThreads = 256;

// Flat grid-stride loops: first over (token, 16-byte chunk of c_kv), then over
// (token, rope pair). Consecutive threads touch consecutive bytes of a row,
// so small rows (SmolLM: 240 bytes) still make full memory transactions.
template <typename T, bool kVectorized, typename Index>
__global__ void latent_cache_append_kernel(
    const T* __restrict__ c_kv, int64_t c_stride, const T* __restrict__ k_rope,
    int64_t k_stride, T* __restrict__ cache, const int64_t* __restrict__ slots,
    int64_t num_slots, int num_tokens, int R, int n_kv, int r, int D,
    const int64_t* __restrict__ positions, const int64_t* __restrict__ freq_idx,
    const float* __restrict__ inv_freq, int n_freq) {
  // Index is uint32_t whenever the counts allow (64-bit division by a
  // runtime divisor costs more than the copy).
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  const Index first = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Negative slots are padding; out-of-range slots (rejected by the Python
  // wrapper before launch) are skipped rather than written out of bounds.
  auto slot_of = [&](Index t) {
    const int64_t slot = slots[t];
    return (slot < 0 || slot >= num_slots) ? int64_t(-1) : slot;
  };
  constexpr int V = kVectorized ? kVec<T> : 1;
  const Index chunks = R / V;
  for (Index i = first; i < static_cast<Index>(num_tokens) * chunks; i += stride) {
    const Index t = i / chunks;
    const int c = static_cast<int>(i - t * chunks);
    const int64_t slot = slot_of(t);
    if (slot < 0) continue;
    if constexpr (kVectorized)
      reinterpret_cast<uint4*>(cache + slot * D)[c] =
          reinterpret_cast<const uint4*>(c_kv + t * c_stride)[c];
    else
      cache[slot * D + c] = c_kv[t * c_stride + c];
  }
  const Index pairs = static_cast<Index>(n_kv) * r;
  for (Index i = first; i < static_cast<Index>(num_tokens) * pairs; i += stride) {
    const Index t = i / pairs;
    const int gj = static_cast<int>(i - t * pairs), g = gj / r, j = gj - g * r;
    const int64_t slot = slot_of(t);
    if (slot < 0) continue;
    const T* k = k_rope + t * k_stride + g * 2 * r;
    const float x1 = to_float(k[j]), x2 = to_float(k[j + r]);
    float y1 = x1, y2 = x2;
    if (positions != nullptr) {
      float c, s;
      rope_cos_sin(positions[t], freq_idx[gj], inv_freq, n_freq, c, s);
      rotate_pair(x1, x2, c, s, y1, y2);
    }
    T* dst = cache + slot * D + R + g * 2 * r;
    dst[j] = from_float<T>(y1);
    dst[j + r] = from_float<T>(y2);
  }
}

// The kernel for rows of whole 16-byte vectors (c_kv and every KV head's rope
// key; bf16/fp16 2r = 8, 16, 32): one thread per (token, unit), where a
// token's units are its R / V latent chunks and then its n_kv rope keys. A
// chunk is one 16-byte load and store; a rope key is CH vectors turned by
// the cos/sin of its r pairs. Each thread issues its loads before it waits
// on the slot and the position (a short op like this is bound by the round
// trips a thread waits on in sequence), and a token's units are adjacent,
// so a warp reads and writes contiguous row bytes.
template <typename T, int CH, typename Index>
__global__ void latent_cache_append_rows_kernel(
    const T* __restrict__ c_kv, int64_t c_stride, const T* __restrict__ k_rope,
    int64_t k_stride, T* __restrict__ cache, const int64_t* __restrict__ slots,
    int64_t num_slots, Index total, int chunks, int n_kv, int D,
    const int64_t* __restrict__ positions, const int64_t* __restrict__ freq_idx,
    const float* __restrict__ inv_freq, int n_freq) {
  constexpr int V = kVec<T>;
  constexpr int r = CH * V / 2;
  const Index units = static_cast<Index>(chunks + n_kv);
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index t = i / units;
    const int u = static_cast<int>(i - t * units);
    const int64_t slot = slots[t];
    if (u < chunks) {
      const uint4 v = reinterpret_cast<const uint4*>(c_kv + t * c_stride)[u];
      // Negative slots are padding; out-of-range ones (rejected by the
      // Python wrapper before launch) are skipped, never written.
      if (slot < 0 || slot >= num_slots) continue;
      reinterpret_cast<uint4*>(cache + slot * D)[u] = v;
      continue;
    }
    const int g = u - chunks;
    uint4 v[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) v[c] = reinterpret_cast<const uint4*>(k_rope + t * k_stride + g * 2 * r)[c];
    if (positions != nullptr) {
      const int64_t pos = positions[t];
      T* e = reinterpret_cast<T*>(v);
#pragma unroll
      for (int j = 0; j < r; ++j) {
        float c, s, y1, y2;
        rope_cos_sin(pos, freq_idx[g * r + j], inv_freq, n_freq, c, s);
        rotate_pair(to_float(e[j]), to_float(e[j + r]), c, s, y1, y2);
        e[j] = from_float<T>(y1);
        e[j + r] = from_float<T>(y2);
      }
    }
    if (slot < 0 || slot >= num_slots) continue;
    uint4* dst = reinterpret_cast<uint4*>(cache + slot * D + chunks * V + g * 2 * r);
#pragma unroll
    for (int c = 0; c < CH; ++c) dst[c] = v[c];
  }
}

}  // namespace

void latent_cache_append_cuda(const at::Tensor& c_kv, const at::Tensor& k_rope,
                              at::Tensor& latent_cache,
                              const at::Tensor& slot_mapping,
                              const c10::optional<at::Tensor>& positions,
                              const c10::optional<at::Tensor>& rope_freq_idx,
                              const c10::optional<at::Tensor>& inv_freq) {
  check_append_args(c_kv, k_rope, latent_cache, slot_mapping, positions,
                    rope_freq_idx, inv_freq);
  const int T = c_kv.size(0);
  if (T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(latent_cache.device());
  const int R = c_kv.size(1), n_kv = k_rope.size(1), r = k_rope.size(2) / 2;
  const int D = latent_cache.size(2);
  const int64_t num_slots = latent_cache.size(0) * latent_cache.size(1);
  const bool fused = positions.has_value();
  const dim3 block(kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  MLA_DISPATCH_FLOAT_TYPES(
      latent_cache.scalar_type(), "append_cuda", [&] {
        constexpr int V = kVec<scalar_t>;
        const bool vec = R % V == 0 && D % V == 0 && c_kv.stride(0) % V == 0 &&
                         is_aligned16(c_kv.data_ptr()) &&
                         is_aligned16(latent_cache.data_ptr());
        // One thread per item of the longer loop (16-byte chunks of c_kv or
        // rope pairs): a grid sized by elements would launch V times the
        // threads the copy has work for.
        const int64_t work = static_cast<int64_t>(T) * std::max(vec ? R / V : R, n_kv * r);
        const dim3 grid(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 1 << 16)));
        auto launch = [&](auto kernel) {
          kernel<<<grid, block, 0, stream>>>(
              c_kv.data_ptr<scalar_t>(), c_kv.stride(0),
              k_rope.data_ptr<scalar_t>(), k_rope.stride(0),
              latent_cache.data_ptr<scalar_t>(),
              slot_mapping.data_ptr<int64_t>(), num_slots, T, R, n_kv, r, D,
              fused ? positions->data_ptr<int64_t>() : nullptr,
              fused ? rope_freq_idx->data_ptr<int64_t>() : nullptr,
              fused ? inv_freq->data_ptr<float>() : nullptr,
              fused ? static_cast<int>(inv_freq->size(0)) : 0);
        };
        const bool small = static_cast<int64_t>(T) * std::max(R, n_kv * r) +
                               static_cast<int64_t>(grid.x) * kThreads < (int64_t(1) << 32);  // 32-bit indices
        // Rope keys of 1, 2 or 4 whole vectors on 16-byte boundaries take the
        // rows kernel with the latent chunks.
        const int ch = 2 * r % V == 0 ? 2 * r / V : 0;
        const bool rows = vec && (ch == 1 || ch == 2 || ch == 4) && is_aligned16(k_rope.data_ptr()) &&
                          k_rope.stride(0) % V == 0 && k_rope.stride(1) == 2 * r && k_rope.stride(2) == 1;
        auto launch_rows = [&](auto ch_tag) {
          constexpr int CH = decltype(ch_tag)::value;
          const int64_t total = static_cast<int64_t>(T) * (R / V + n_kv);
          const dim3 row_grid(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20)));
          auto run = [&](auto index_tag) {
            using Index = decltype(index_tag);
            latent_cache_append_rows_kernel<scalar_t, CH, Index><<<row_grid, block, 0, stream>>>(
                c_kv.data_ptr<scalar_t>(), c_kv.stride(0), k_rope.data_ptr<scalar_t>(), k_rope.stride(0),
                latent_cache.data_ptr<scalar_t>(), slot_mapping.data_ptr<int64_t>(), num_slots,
                static_cast<Index>(total), R / V, n_kv, D,
                fused ? positions->data_ptr<int64_t>() : nullptr,
                fused ? rope_freq_idx->data_ptr<int64_t>() : nullptr,
                fused ? inv_freq->data_ptr<float>() : nullptr,
                fused ? static_cast<int>(inv_freq->size(0)) : 0);
          };
          if (total + static_cast<int64_t>(row_grid.x) * kThreads < (int64_t(1) << 32)) run(uint32_t{});
          else run(int64_t{});
        };
        if (rows && ch == 1) launch_rows(std::integral_constant<int, 1>{});
        else if (rows && ch == 2) launch_rows(std::integral_constant<int, 2>{});
        else if (rows && ch == 4) launch_rows(std::integral_constant<int, 4>{});
        else if (vec && small) launch(latent_cache_append_kernel<scalar_t, true, uint32_t>);
        else if (vec) launch(latent_cache_append_kernel<scalar_t, true, int64_t>);
        else if (small) launch(latent_cache_append_kernel<scalar_t, false, uint32_t>);
        else launch(latent_cache_append_kernel<scalar_t, false, int64_t>);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("latent_cache_append", &latent_cache_append_cuda);
}

}  // namespace mla_cuda
