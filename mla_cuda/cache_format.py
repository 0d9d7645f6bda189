"""Cache formats of the paged latent cache, by name, and the byte layout of
a quantized row (docs/ops.md, "Quantized caches"; the kernels' copy of the
layout is csrc/quantized_format.h, and the ops refuse a cache whose rows
disagree with it).

A 16-bit (or float32) cache stores each token's row [c_kv | rope keys] in
one floating dtype. A quantized cache is uint8, one row of row_bytes per
token: [latent codes | float32 scales | rope keys in the model dtype | zero
pad to a multiple of 16 bytes].
  "fp8"   e4m3fn codes, one byte a channel, scale = amax / 448 per token;
  "int4"  two channels a byte (low nibble = even channel), symmetric codes
          in [-7, 7], scale = amax / 7 per token;
  "<kind>-g<N>"  one scale per group of N consecutive channels.
"""
import re
from dataclasses import dataclass
from typing import Optional

import torch

QUANTIZED_KINDS = ("fp8", "int4")
_FORMAT = re.compile(r"^(fp8|int4)(?:-g(\d{1,9}))?$")
_FLOAT_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


@dataclass(frozen=True)
class QuantizedRowLayout:
    """Byte offsets of one quantized cache row (all multiples of 4)."""

    cache_format: str
    kind: str          # "fp8" or "int4"
    latent_dim: int    # R
    group: int         # channels per scale
    num_scales: int
    code_bytes: int
    scale_offset: int
    rope_offset: int
    rope_bytes: int
    row_bytes: int     # a multiple of 16


def is_quantized(cache_format: Optional[str]) -> bool:
    return isinstance(cache_format, str) and _FORMAT.match(cache_format) is not None


def quantized_row_layout(cache_format: str, latent_dim: int, rope_dim: int, rope_dtype: torch.dtype,
                         kv_heads: int = 1) -> QuantizedRowLayout:
    """Layout of a row of `cache_format` for a latent of latent_dim channels
    and kv_heads rope keys of rope_dim values each, stored in rope_dtype."""
    m = _FORMAT.match(cache_format) if isinstance(cache_format, str) else None
    if m is None:
        raise ValueError(f"mla_cuda: unknown cache format {cache_format!r}; use 'fp8', 'int4', 'fp8-g<N>' or "
                         "'int4-g<N>' (N channels per scale)")
    kind, group = m.group(1), int(m.group(2)) if m.group(2) else latent_dim
    if group <= 0 or latent_dim % group or (kind == "int4" and group % 2):
        raise ValueError(f"mla_cuda: cache format {cache_format!r} needs groups that divide R={latent_dim}"
                         + (" and are even (two channels a byte)" if kind == "int4" else ""))
    code_bytes = latent_dim if kind == "fp8" else latent_dim // 2
    scale_offset = _align(code_bytes, 4)
    rope_offset = scale_offset + 4 * (latent_dim // group)
    rope_bytes = kv_heads * rope_dim * torch.empty((), dtype=rope_dtype).element_size()
    return QuantizedRowLayout(cache_format, kind, latent_dim, group, latent_dim // group, code_bytes, scale_offset,
                              rope_offset, rope_bytes, _align(rope_offset + rope_bytes, 16))


def resolve_cache_format(cache_dtype, model_dtype: torch.dtype):
    """(storage dtype, cache_format) of a cache_dtype option: None or "auto"
    (the model dtype), a floating dtype name or torch.dtype equal to the
    model's, or a quantized format name. The floating cache holds what the
    model computes, so a different floating dtype is refused (cast the
    model instead)."""
    if cache_dtype is None or cache_dtype == "auto":
        return model_dtype, None
    if is_quantized(cache_dtype):
        return torch.uint8, cache_dtype
    dtype = _FLOAT_NAMES.get(cache_dtype, cache_dtype) if isinstance(cache_dtype, str) else cache_dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown cache_dtype {cache_dtype!r}: use 'auto' (the model dtype), 'bf16', 'fp16', "
                         "'fp32', 'fp8', 'int4' or 'int4-g<N>'")
    if dtype != model_dtype:
        raise ValueError(f"cache_dtype {cache_dtype!r} differs from the model dtype {model_dtype}; cast the model "
                         f"(model.to({dtype})) or use cache_dtype='auto', 'fp8' or 'int4'")
    return dtype, None


def row_bytes(cache_format: Optional[str], latent_dim: int, rope_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one token's row in one layer: (R + rope_dim) values of dtype
    for a floating cache (cache_format None), the quantized row otherwise
    (rope_dim: all rope values of the row, in dtype)."""
    if cache_format is None:
        return (latent_dim + rope_dim) * torch.empty((), dtype=dtype).element_size()
    return quantized_row_layout(cache_format, latent_dim, rope_dim, dtype).row_bytes
