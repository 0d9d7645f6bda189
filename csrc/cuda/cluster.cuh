// Thread-block clusters (sm_90): stores into another block's shared memory
// (distributed shared memory) and the cluster-wide barrier that orders them.
// Used by the Hopper decode kernel (mla_decode_wgmma.cuh) to sum score
// partials across the blocks that split a cache row between them. Compiles
// to nothing before sm_90; the host launches clusters only on sm_90.
#pragma once

#include <cstdint>

namespace mla_cuda {
namespace cluster {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MLA_CLUSTER_ENABLED 1
#endif

// The address in block `peer`'s shared memory of what `addr` is in ours.
__device__ __forceinline__ uint32_t peer_address(uint32_t addr, uint32_t peer) {
  uint32_t r = addr;
#ifdef MLA_CLUSTER_ENABLED
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(peer));
#endif
  return r;
}

// A 16-byte store to a shared::cluster address (ours or a peer's).
__device__ __forceinline__ void store(uint32_t addr, float a, float b, float c, float d) {
#ifdef MLA_CLUSTER_ENABLED
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c),
               "f"(d)
               : "memory");
#endif
}

// Every thread of every block of the cluster arrives, then waits: stores
// before it (to any block's shared memory) are visible after it.
__device__ __forceinline__ void sync() {
#ifdef MLA_CLUSTER_ENABLED
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

}  // namespace cluster
}  // namespace mla_cuda
