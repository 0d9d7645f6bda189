// FMA decode kernels for float16 caches (see mla_decode_fma.cuh).
#include "../mla_decode_fma.cuh"

MLA_INSTANTIATE_FMA_DECODE(c10::Half, 4)
MLA_INSTANTIATE_FMA_DECODE(c10::Half, 8)
MLA_INSTANTIATE_FMA_DECODE(c10::Half, 16)
