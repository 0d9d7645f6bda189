// FMA decode kernels for bfloat16 caches (see mla_decode_fma.cuh).
#include "../mla_decode_fma.cuh"

MLA_INSTANTIATE_FMA_DECODE(c10::BFloat16, 4)
MLA_INSTANTIATE_FMA_DECODE(c10::BFloat16, 8)
MLA_INSTANTIATE_FMA_DECODE(c10::BFloat16, 16)
