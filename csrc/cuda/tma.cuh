// Hopper bulk tensor copies (TMA, sm_90) and the shared-memory barriers
// (mbarrier) they complete on, for the decode kernel of
// mla_decode_wgmma.cuh. One thread asks the copy engine for a whole box of
// a 2-D tensor (described on the host by a CUtensorMap) and the engine
// writes it into shared memory, 128-byte-swizzled as wgmma reads it: the
// staging costs the kernel a few instructions a tile instead of a few per
// row. Everything here compiles to nothing outside sm_90+ device passes.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace mla_cuda {
namespace tma {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MLA_TMA_ENABLED 1
#endif

// A barrier that completes a phase when `count` threads have arrived and
// every byte announced by arrive_expect_tx has landed.
__device__ __forceinline__ void barrier_init(uint32_t bar, uint32_t count) {
#ifdef MLA_TMA_ENABLED
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

// Makes initialized barriers visible to the copy engine (before the block
// barrier that follows the initialization).
__device__ __forceinline__ void fence_barrier_init() {
#ifdef MLA_TMA_ENABLED
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Arrives on `bar` and announces `bytes` more bytes for its current phase.
__device__ __forceinline__ void arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#ifdef MLA_TMA_ENABLED
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

// Waits until the phase of `bar` with this parity has completed; its bytes
// are then visible to the waiting thread.
__device__ __forceinline__ void wait_parity(uint32_t bar, uint32_t parity) {
#ifdef MLA_TMA_ENABLED
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// Copies the box at element coordinates (x, y) of the 2-D tensor `map`
// (x along the contiguous dimension) to shared memory at `dst`, completing
// its bytes on `bar`. Coordinates outside the tensor read as zero. `map`
// must live in kernel parameter (__grid_constant__), constant or global memory.
__device__ __forceinline__ void load_2d(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
#ifdef MLA_TMA_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
#endif
}

}  // namespace tma
}  // namespace mla_cuda
