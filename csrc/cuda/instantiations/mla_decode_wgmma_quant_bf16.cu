// Hopper (wgmma) decode kernels over quantized latent rows (fp8 and int4
// codes, bfloat16 queries and rope keys), one per configuration of
// MLA_WGMMA_CONFIGS and format (see mla_decode_wgmma.cuh).
#include "../mla_decode_wgmma.cuh"

#define MLA_INSTANTIATE_FP8(name, NG, C) \
  MLA_INSTANTIATE_WGMMA_DECODE(c10::BFloat16, NG, C, mla_cuda::wgmma_decode::CacheRows::kFp8)
#define MLA_INSTANTIATE_INT4(name, NG, C) \
  MLA_INSTANTIATE_WGMMA_DECODE(c10::BFloat16, NG, C, mla_cuda::wgmma_decode::CacheRows::kInt4)
MLA_WGMMA_CONFIGS(MLA_INSTANTIATE_FP8)
MLA_WGMMA_CONFIGS(MLA_INSTANTIATE_INT4)
