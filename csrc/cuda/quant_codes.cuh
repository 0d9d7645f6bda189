// fp8 (e4m3) and int4 codes as pairs of 16-bit values of T, exactly (every
// e4m3 value and int4 code is exact in fp16 and bf16), the factor P times
// the scale enters the second product with, and the values of rows with a
// scale per group of channels: shared by the quantized decode kernels
// (mla_decode_quant.cuh, mla_decode_wgmma.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "mma_sync.cuh"

namespace mla_cuda {

// P * scale enters the second product as T. In fp16 a small scale would
// push most of it below fp16's normal range (6e-5), so it goes in
// multiplied by the largest power of two that cannot overflow (scale <=
// 65504 / 448 for fp8 codes, 65504 / 7 for int4), and the output comes out
// divided by it.
template <typename T, bool kFp8Codes>
constexpr float kPFactor = std::is_same_v<T, c10::Half> ? (kFp8Codes ? 256.f : 4.f) : 1.f;

// Two 16-bit elements of T from two fp8 e4m3 codes (low byte first).
template <typename T>
__device__ __forceinline__ uint32_t fp8x2_to(uint32_t two_codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes & 0xFFFFu), __NV_E4M3);
  uint32_t bits = static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&bits));
    return mma_decode::Mma<T>::pack(f.x, f.y);
  }
  return bits;
}

// Two bf16 from two fp8 e4m3 codes held in the low byte of each 16-bit half
// (bits 0-7 and 16-23), by integer and packed bf16 arithmetic rather than
// conversions through float: the bits are spread into a bf16 (sign, then
// exponent and mantissa 4 bits down: the value times 2^-120, subnormal codes
// included) and multiplied by 2^120. Exact for every finite code; a NaN code
// comes out finite (+-480), so a poisoned row is NaN through its scale.
__device__ __forceinline__ uint32_t fp8x2_spread_to_bf16(uint32_t pair) {
  uint32_t bits = ((pair << 8) & 0x80008000u) | ((pair << 4) & 0x07F007F0u);
  const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&bits),
                                   __nv_bfloat162(__ushort_as_bfloat16(0x7B80), __ushort_as_bfloat16(0x7B80)));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two 16-bit elements of T from the two's-complement int4 codes at bits
// 0-3 and 16-19 of v (the other bits are ignored), exactly: each code + 8
// goes into the low mantissa bits of 1024 (fp16) or 128 (bf16), and 1032 or
// 136 comes off. Mask, offset and exponent bits are one three-input logic
// operation, (v & 0x000F000F) ^ (bias | 8 in each half), as the bias bits
// and the nibbles never overlap.
template <typename T>
__device__ __forceinline__ uint32_t int4x2_from_low_nibbles(uint32_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t b = (v & 0x000F000Fu) ^ 0x43084308u;
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&b),
                                     __floats2bfloat162_rn(136.f, 136.f));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const uint32_t b = (v & 0x000F000Fu) ^ 0x64086408u;
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&b), __floats2half2_rn(1032.f, 1032.f));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
}

// A pair of 16-bit values of T as two floats (low element first).
template <typename T>
__device__ __forceinline__ float2 pair_to_float2(uint32_t pair) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xFFFF0000u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&pair));
  }
}

// Rows with several scales (formats "<kind>-g<N>" whose groups are smaller
// than the latent): a pair of exact code values times its scales (one per
// element: the two may be two tokens'), the float32 products rounded to T:
// the values quantized_format.h's quant_attention_value defines for every
// backend, as a 16-bit cache of the dequantized latent would hold them. No
// per-token factor is left to apply to the scores and P. A NaN scale (a
// poisoned row) makes both values NaN.
template <typename T>
__device__ __forceinline__ uint32_t scale_pair(uint32_t pair, float lo_scale, float hi_scale) {
  const float2 f = pair_to_float2<T>(pair);
  return mma_decode::Mma<T>::pack(f.x * lo_scale, f.y * hi_scale);
}

}  // namespace mla_cuda
