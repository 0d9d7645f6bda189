// Small device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace mla_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The natural log-sum-exp of a row from its running max (log2 domain) and
// sum: -inf when the row saw no key (sum 0), NaN when a NaN reached the sum,
// so that a poisoned split stays poisoned through the combine.
__host__ __device__ __forceinline__ float row_lse(float max_log2, float sum) {
  return sum == 0.f ? -INFINITY : (max_log2 + log2f(sum)) * kLn2;
}

// A 32-bit word that is NaN read as one float32 and as two float16 or
// bfloat16 halves: fills a staged cache row that must not be read as data
// (an out-of-range block id), whatever the cache dtype.
constexpr uint32_t kNanWord = 0x7fc07fc0u;

// Elements per 16-byte vector for a storage type.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }

// Unpacks one 16-byte vector of T into kVec<T> floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float* out);

template <>
__device__ __forceinline__ void unpack16<float>(const uint4& u, float* out) {
  out[0] = __uint_as_float(u.x); out[1] = __uint_as_float(u.y);
  out[2] = __uint_as_float(u.z); out[3] = __uint_as_float(u.w);
}

template <>
__device__ __forceinline__ void unpack16<c10::BFloat16>(const uint4& u, float* out) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> f32 is a 16-bit shift
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void unpack16<c10::Half>(const uint4& u, float* out) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Rotates the pair (x1, x2) by angle: (x1 c - x2 s, x2 c + x1 s).
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s,
                                            float& y1, float& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}

// Programmatic dependent launch (sm_90+; nothing on older GPUs, and
// nothing for a kernel launched without the attribute): a dependent kernel
// waits for the grid before it in the stream to finish and its writes to be
// visible; a primary kernel lets its dependent launch before it exits.
__device__ __forceinline__ void wait_for_primary_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// cos/sin of positions * inv_freq[freq_idx]; an out-of-range frequency index
// (which the Python wrapper rejects before launch) yields NaN, never a read
// outside inv_freq.
__device__ __forceinline__ void rope_cos_sin(int64_t pos, int64_t freq_idx,
                                             const float* inv_freq, int n_freq,
                                             float& c, float& s) {
  if (freq_idx < 0 || freq_idx >= n_freq) {
    c = s = __int_as_float(0x7fffffff);
    return;
  }
  sincosf(static_cast<float>(pos) * inv_freq[freq_idx], &s, &c);
}

// 16-byte global -> shared copy, asynchronous on sm_80+ (cp.async, no
// register staging); call cp_async_commit() after a batch and
// cp_async_wait<N>() before reading (N = batches allowed still in flight).
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

// As copy16_async, but reads nothing and writes 16 zero bytes when `valid`
// is false (cp.async's source size 0): rows past a sequence's end go through
// the same instruction as real ones. `gmem` must still be a global address.
// This form takes the destination as a shared-memory address (a kernel that
// keeps its stage offsets as 32-bit addresses saves the conversion); sm_80+
// device code only, as such an address means nothing to a plain store.
__device__ __forceinline__ void copy16_async_or_zero(uint32_t smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

// The same with a generic pointer to shared memory, and a plain copy before sm_80.
__device__ __forceinline__ void copy16_async_or_zero(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  copy16_async_or_zero(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, valid);
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

inline bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

}  // namespace mla_cuda
