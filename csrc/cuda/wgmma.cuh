// Hopper warpgroup matrix multiply (wgmma.mma_async, sm_90a) for the decode
// kernel of mla_decode_wgmma.cuh: shared-memory matrix descriptors for the
// 128-byte-swizzled layout, the m64n32k16 product with float32 accumulators,
// and the fences around it. Everything here compiles to nothing outside an
// sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL); the host only picks the kernel
// when the library was built for sm_90a and the GPU is sm_90.
//
// The operand layout (both operands, and both products of the kernel): rows
// of 16-bit values cut into column blocks of 64 values (128 bytes); block cb
// of an operand of `rows` rows holds row r at byte (cb * rows + r) * 128,
// and the 16-byte chunk c (0..7) of that row at chunk c ^ (r % 8). That is
// the hardware's 128-byte swizzle, so one layout serves as a K-major operand
// (rows = M or N, 64 K values per block) and as an M-major one (rows = K,
// 64 M values per block): the decode kernel reads its cache tile both ways.
#pragma once

#include <cstdint>

namespace mla_cuda {
namespace wgmma {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLA_WGMMA_ENABLED 1
#endif

// Byte offset of 16-byte chunk `chunk` (counted along the whole row) of row
// `row` in an operand of `rows` rows (a multiple of 8), laid out as above.
__host__ __device__ __forceinline__ uint32_t swizzled_offset(int rows, int row, int chunk) {
  return static_cast<uint32_t>(((chunk >> 3) * rows + row) * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// A matrix descriptor for the 128-byte swizzle. `addr` is a shared-memory
// address whose bits 7-9 are zero (an 8-row group starts there; +32 bytes per
// 16-wide k step inside a 128-byte row is allowed, as the swizzle is applied
// to the computed address). K-major: sbo = 1024 (next 8 rows), lbo unused.
// M-major: sbo = 1024 (next 8 k rows), lbo = the next 64-wide M block.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void fence() {
#ifdef MLA_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void commit() {
#ifdef MLA_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wait() {
#ifdef MLA_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Pins accumulator registers at this point of the program: the compiler may
// not move their ordinary arithmetic (a zero fill, a softmax rescale) into
// the stretch where wgmma owns them, which would serialize the products.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared memory written by ordinary stores or cp.async, read next by wgmma
// (the async proxy): each writing thread fences before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef MLA_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Named barrier over the 128 threads of one warpgroup (ids 1.. ; 0 is
// __syncthreads).
__device__ __forceinline__ void warpgroup_barrier(int id) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}

// d[64 x 32] (+)= A[64 x 16] . B[16 x 32], A and B from shared memory; A is
// K-major (kTransA = 0) or M-major (1), B K-major. `accumulate` = 0 writes d.
// The accumulator fragment: thread t of the warpgroup holds rows
// 16 * (t / 32) + (t % 32) / 4 (+ 8) and columns 8 j + 2 (t % 4) (+ 1):
// d[4 j + 0] = (row, col), [4 j + 1] = (row, col + 1), [4 j + 2] = (row + 8,
// col), [4 j + 3] = (row + 8, col + 1).
template <bool kBf16, int kTransA>
__device__ __forceinline__ void mma_m64n32k16(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#ifdef MLA_WGMMA_ENABLED
#define MLA_WGMMA_ASM(TYPE)                                                                          \
  asm volatile(                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                   \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "                                 \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, %19, 0;\n}\n"     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),      \
        "+f"(d[14]), "+f"(d[15])                                                                     \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA))
  if constexpr (kBf16) MLA_WGMMA_ASM("bf16");
  else MLA_WGMMA_ASM("f16");
#undef MLA_WGMMA_ASM
#endif
}

}  // namespace wgmma
}  // namespace mla_cuda
