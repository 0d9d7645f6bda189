// Tensor-core decode kernels for float16 caches, one per configuration of
// MLA_MMA_CONFIGS (see mla_decode_mma.cuh).
#include "../mla_decode_mma.cuh"

#define MLA_INSTANTIATE(name, WC, WT, KQ, KN) MLA_INSTANTIATE_MMA_DECODE(c10::Half, WC, WT, KQ, KN)
MLA_MMA_CONFIGS(MLA_INSTANTIATE)
