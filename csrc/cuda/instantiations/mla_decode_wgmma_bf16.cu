// Hopper (wgmma) decode kernels for bfloat16 caches, one per configuration
// of MLA_WGMMA_CONFIGS (see mla_decode_wgmma.cuh).
#include "../mla_decode_wgmma.cuh"

#define MLA_INSTANTIATE(name, NG, C) MLA_INSTANTIATE_WGMMA_DECODE(c10::BFloat16, NG, C, mla_cuda::wgmma_decode::CacheRows::k16Bit)
MLA_WGMMA_CONFIGS(MLA_INSTANTIATE)
