// Quantized latent-cache formats (docs/ops.md, "Quantized caches"): the
// layout of one cache row and the code <-> value maps, shared by the CPU
// reference kernels and the CUDA kernels so both write and read the same
// bytes. Everything a kernel needs is plain integers (QuantLayout) and the
// C10_HOST_DEVICE functions below.
//
// Row of one token, a uint8 tensor row of row_bytes:
//   [ codes | scales (float32, one per group of channels) | rope keys (the
//     queries' dtype) | zero pad to a multiple of 16 bytes ]
// fp8:  R bytes, float8 e4m3fn codes, scale = amax / 448.
// int4: R/2 bytes, two channels a byte (low nibble = even channel),
//       symmetric codes in [-7, 7] (two's complement nibbles), scale = amax / 7.
// A group is `group` consecutive channels (the whole latent by default: one
// scale per token); "<kind>-g<N>" names groups of N channels. Attention
// reads a channel as code x scale, rounded to the queries' 16-bit type in
// rows with several groups (quant_attention_value).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace mla_cuda {

enum class QuantKind : int { kFp8 = 0, kInt4 = 1 };

constexpr float kFp8Max = 448.f;  // largest finite e4m3fn value
constexpr float kInt4Max = 7.f;   // symmetric: -8 is never written

struct QuantLayout {
  QuantKind kind;
  int64_t R;             // latent channels
  int64_t group;         // channels per scale
  int64_t num_scales;    // R / group
  int64_t code_bytes;    // R (fp8) or R/2 (int4)
  int64_t scale_offset;  // bytes from the row start, 4-aligned
  int64_t rope_offset;   // 4-aligned
  int64_t rope_bytes;    // n_kv * 2r * element size of the rope dtype
  int64_t row_bytes;     // a multiple of 16
};

// Parses "fp8", "int4", "fp8-g<N>", "int4-g<N>" for a latent of R channels
// and a rope part of rope_bytes; a bad name or a group that does not fit R is
// a one-line error naming what is accepted.
QuantLayout quant_layout(const std::string& cache_format, int64_t R,
                         int64_t rope_bytes);

// ---- codes (identical on host and device) -----------------------------------

// Scale of a group with absolute maximum amax; 0 for an all-zero group
// (its codes are then 0, and so are its values).
C10_HOST_DEVICE inline float quant_scale(QuantKind kind, float amax) {
  return amax / (kind == QuantKind::kFp8 ? kFp8Max : kInt4Max);
}

// The code of value x in a group whose scale is `scale`: x * (max / amax),
// rounded to the nearest code (ties to even), saturating. For int4 the
// result is the signed code in [-7, 7]; store it as (code & 0xF).
C10_HOST_DEVICE inline uint8_t fp8_code(float x, float inv_scale) {
  float v = x * inv_scale;
  v = v > kFp8Max ? kFp8Max : (v < -kFp8Max ? -kFp8Max : v);
  return c10::Float8_e4m3fn(v).x;
}

C10_HOST_DEVICE inline int int4_code(float x, float inv_scale) {
  float v = x * inv_scale;
  if (v != v) return 0;  // a NaN channel: its group's scale is NaN already
  v = v > kInt4Max ? kInt4Max : (v < -kInt4Max ? -kInt4Max : v);
#ifdef __CUDA_ARCH__
  return __float2int_rn(v);
#else
  return static_cast<int>(std::nearbyint(v));  // default rounding: ties to even
#endif
}

// max(|a|, b) that keeps a NaN: fmaxf and std::max drop one, which would
// quantize a NaN channel as if it were a number.
C10_HOST_DEVICE inline float nan_abs_max(float a, float b) {
  const float m = a < 0.f ? -a : a;
  return (m != m || m > b) ? m : b;
}

// 1 / scale as both backends compute it: max / amax (0 for an empty group).
C10_HOST_DEVICE inline float quant_inv_scale(QuantKind kind, float amax) {
  return amax > 0.f ? (kind == QuantKind::kFp8 ? kFp8Max : kInt4Max) / amax
                    : 0.f;
}

C10_HOST_DEVICE inline float fp8_value(uint8_t code) {
  return static_cast<float>(c10::Float8_e4m3fn(code, c10::Float8_e4m3fn::from_bits()));
}

// Signed value of the nibble of channel d (low nibble = even channel).
C10_HOST_DEVICE inline float int4_value(uint8_t byte, int64_t d) {
  const int nib = (d & 1) ? (byte >> 4) : (byte & 0xF);
  return static_cast<float>(nib >= 8 ? nib - 16 : nib);
}

// Value of latent channel d of a row laid out by l (codes, then scales).
C10_HOST_DEVICE inline float quant_channel_value(const uint8_t* row,
                                                 const QuantLayout& l,
                                                 int64_t d) {
  float scale;
  const uint8_t* s = row + l.scale_offset + 4 * (d / l.group);
#ifdef __CUDA_ARCH__
  scale = *reinterpret_cast<const float*>(s);
#else
  __builtin_memcpy(&scale, s, 4);
#endif
  return (l.kind == QuantKind::kFp8 ? fp8_value(row[d])
                                    : int4_value(row[d >> 1], d)) *
         scale;
}

// The value channel d stands for in attention whose queries (and rope
// keys) are of type T: code x scale, and for rows with several scales
// (group < R) that product rounded to T, as the tensor-core kernels take
// it. Every backend reads the same values: a row with one scale keeps its
// codes exact (its scale multiplies whole scores), a row with several
// holds the values a 16-bit cache of the dequantized latent would.
template <typename T>
C10_HOST_DEVICE inline float quant_attention_value(float code_times_scale, const QuantLayout& l) {
  if constexpr (std::is_same_v<T, float>) {
    return code_times_scale;
  } else {
    return l.group < l.R ? static_cast<float>(static_cast<T>(code_times_scale)) : code_times_scale;
  }
}

}  // namespace mla_cuda
