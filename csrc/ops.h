// Declarations shared by the schema registry, the CPU kernels and the CUDA
// kernels. Shapes use the names of docs/ops.md:
//   T tokens, B sequences, Q query tokens per sequence, n_h query heads,
//   n_kv KV heads, R latent width, 2r rope width per head,
//   D = R + n_kv * 2r cache row width.
#pragma once

#include <ATen/ATen.h>

#include "quantized_format.h"

#include <string>
#include <vector>

namespace mla_cuda {

// ---- argument checks shared by every backend (csrc/arg_checks.cpp) -------
// They look at shapes, dtypes, devices and strides only, never at tensor
// data, so they are safe inside CUDA-graph capture. Index-range checks that
// must read data live in the CPU kernels and in the Python wrapper.
void check_append_args(const at::Tensor& c_kv, const at::Tensor& k_rope,
                       const at::Tensor& latent_cache,
                       const at::Tensor& slot_mapping,
                       const c10::optional<at::Tensor>& positions,
                       const c10::optional<at::Tensor>& rope_freq_idx,
                       const c10::optional<at::Tensor>& inv_freq);
void check_rope_args(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& positions,
                     const at::Tensor& rope_freq_idx,
                     const at::Tensor& inv_freq);
void check_attention_args(const at::Tensor& q_latent, const at::Tensor& q_rope,
                          const at::Tensor& latent_cache,
                          const at::Tensor& block_table,
                          const at::Tensor& seq_lens);
// The quantized-cache ops' checks also check the cache row against the
// format's layout, which they return.
QuantLayout check_append_quantized_args(
    const at::Tensor& c_kv, const at::Tensor& k_rope,
    const at::Tensor& latent_cache, const at::Tensor& slot_mapping,
    const std::string& cache_format, const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq);
QuantLayout check_attention_quantized_args(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const std::string& cache_format,
    int64_t kv_heads);

// ---- CPU kernels (csrc/cpu/) ---------------------------------------------
void latent_cache_append_cpu(const at::Tensor& c_kv, const at::Tensor& k_rope,
                             at::Tensor& latent_cache,
                             const at::Tensor& slot_mapping,
                             const c10::optional<at::Tensor>& positions,
                             const c10::optional<at::Tensor>& rope_freq_idx,
                             const c10::optional<at::Tensor>& inv_freq);
void partial_rope_inplace_cpu(at::Tensor& q, at::Tensor& k,
                              const at::Tensor& positions,
                              const at::Tensor& rope_freq_idx,
                              const at::Tensor& inv_freq, bool inverse);
std::tuple<at::Tensor, at::Tensor> mla_attention_cpu(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, int64_t num_splits);
void latent_cache_append_quantized_cpu(
    const at::Tensor& c_kv, const at::Tensor& k_rope, at::Tensor& latent_cache,
    const at::Tensor& slot_mapping, const std::string& cache_format,
    const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq);
std::tuple<at::Tensor, at::Tensor> mla_attention_quantized_cpu(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, const std::string& cache_format,
    int64_t kv_heads);

// ---- CUDA kernels (csrc/cuda/) -------------------------------------------
#ifdef MLA_WITH_CUDA
void latent_cache_append_cuda(const at::Tensor& c_kv, const at::Tensor& k_rope,
                              at::Tensor& latent_cache,
                              const at::Tensor& slot_mapping,
                              const c10::optional<at::Tensor>& positions,
                              const c10::optional<at::Tensor>& rope_freq_idx,
                              const c10::optional<at::Tensor>& inv_freq);
void partial_rope_inplace_cuda(at::Tensor& q, at::Tensor& k,
                               const at::Tensor& positions,
                               const at::Tensor& rope_freq_idx,
                               const at::Tensor& inv_freq, bool inverse);
std::tuple<at::Tensor, at::Tensor> mla_attention_cuda(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, int64_t num_splits);
void latent_cache_append_quantized_cuda(
    const at::Tensor& c_kv, const at::Tensor& k_rope, at::Tensor& latent_cache,
    const at::Tensor& slot_mapping, const std::string& cache_format,
    const c10::optional<at::Tensor>& positions,
    const c10::optional<at::Tensor>& rope_freq_idx,
    const c10::optional<at::Tensor>& inv_freq);
std::tuple<at::Tensor, at::Tensor> mla_attention_quantized_cuda(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, const std::string& cache_format,
    int64_t kv_heads);

// The decode kernel mla_attention runs on CUDA, by name: "auto" (the first
// tensor-core configuration that holds the shape: warp-stream ones, then
// cooperative ones; else FMA), "fma", or one tensor-core configuration
// (where it holds the shape, else FMA).
// MLA_DECODE_KERNEL sets it, read once at the first call; set_decode_kernel
// changes it for the calls that follow (tests, benchmarks). An unknown name
// is an error that lists decode_kernel_names().
std::vector<std::string> decode_kernel_names();
std::string decode_kernel();
void set_decode_kernel(const std::string& name);
// Quantized attention on the Hopper kernel (mla_attention.cu), where the
// build, the GPU, the kernel choice and the shape allow it; false leaves
// the call to the other quantized kernels (quantized_cache.cu).
bool mla_attention_quantized_wgmma(const at::Tensor& q_latent, const at::Tensor& q_rope,
                                   const at::Tensor& latent_cache, const at::Tensor& block_table,
                                   const at::Tensor& seq_lens, double scale, const QuantLayout& layout,
                                   int64_t kv_heads, at::Tensor& out, at::Tensor& lse);
#endif

}  // namespace mla_cuda

// The dtypes every mla_cuda kernel takes: float32, float16, bfloat16.
#include <ATen/Dispatch.h>
#define MLA_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
