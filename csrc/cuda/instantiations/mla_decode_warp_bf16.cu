// Warp-stream decode kernels for bfloat16 caches, one per configuration of
// MLA_WARP_CONFIGS (see mla_decode_warp.cuh).
#include "../mla_decode_warp.cuh"

#define MLA_INSTANTIATE(name, NW, S, NT, KQ, KN) MLA_INSTANTIATE_WARP_DECODE(c10::BFloat16, NW, S, NT, KQ, KN)
MLA_WARP_CONFIGS(MLA_INSTANTIATE)
