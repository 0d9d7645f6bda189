// FMA decode kernels for float32 caches (see mla_decode_fma.cuh).
#include "../mla_decode_fma.cuh"

MLA_INSTANTIATE_FMA_DECODE(float, 4)
MLA_INSTANTIATE_FMA_DECODE(float, 8)
MLA_INSTANTIATE_FMA_DECODE(float, 16)
