// The tensor-core pieces both 16-bit decode kernels (mla_decode_mma.cuh,
// mla_decode_warp.cuh) are built from: mma.sync m16n8k16 with float32
// accumulators and ldmatrix from shared memory (sm_80+; on older GPUs these
// compile to nothing and the host never picks these kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common.cuh"

namespace mla_cuda {
namespace mma_decode {

template <typename T>
struct Mma;

template <>
struct Mma<c10::BFloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Mma<c10::Half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// Four 8x8 16-bit matrices from shared memory; lane i gives the address of
// row i % 8 of matrix i / 8. `trans` hands out the transposed matrices.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// The two query rows of a lane's mma fragments (m and m + 8) of sequence b:
// their row in q_latent / q_rope, whether they exist (rows past M are
// padding), and where their KV head's rope keys start in a cache row
// (rope_base: R where the rope part follows the latent in the row, 0 where
// it is addressed on its own).
template <int N>
struct QueryRows {
  int64_t q_row[N];
  int rope_off[N];
  bool live[N];
  template <typename Shape>
  __device__ __forceinline__ QueryRows(const Shape& p, int b, int m, int rope_base) {
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const int mm = m + 8 * r;
      live[r] = mm < p.M;
      q_row[r] = static_cast<int64_t>(b) * p.M + mm;
      rope_off[r] = rope_base + (mm % p.n_h) / (p.n_h / p.n_kv) * p.rope2;
    }
  }
};

// The A fragments of q_aug (q_latent, then q_rope in the slot of the row's
// KV head, zeros elsewhere and past D) for the 16-wide k steps k_first + i,
// i < count (zero for the rest), of the 16 query rows from m0 of sequence b,
// straight from global memory: the loads are independent, so all of them are
// in flight together. The latent part is read as 32-bit pairs (R is even and
// q_latent 4-byte aligned: the host checks); the rope columns element by
// element.
template <typename T, int KQ, typename Shape>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[KQ][4], const T* __restrict__ q_latent,
                                                 const T* __restrict__ q_rope, const Shape& p, int b,
                                                 int m0, int k_first, int count, int lane) {
  const int fc = 2 * (lane % 4);
  const QueryRows<2> rows(p, b, m0 + lane / 4, p.R);
  auto rope_elem = [&](int r, int d) -> float {
    const int k = d - rows.rope_off[r];
    return d < p.D && k >= 0 && k < p.rope2 ? to_float(q_rope[rows.q_row[r] * p.rope2 + k]) : 0.f;
  };
#pragma unroll
  for (int i = 0; i < KQ; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e % 2, col = (k_first + i) * 16 + fc + 8 * (e / 2);
      uint32_t v = 0u;
      if (i < count && rows.live[r]) {
        if (col < p.R)
          v = __ldg(reinterpret_cast<const unsigned int*>(q_latent + rows.q_row[r] * p.R + col));
        else
          v = Mma<T>::pack(rope_elem(r, col), rope_elem(r, col + 1));
      }
      qf[i][e] = v;
    }
}

}  // namespace mma_decode
}  // namespace mla_cuda
