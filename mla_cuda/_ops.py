"""User-facing wrappers of torch.ops.mla_cuda: argument checks a user can act
on, fake (meta) kernels for torch.compile, and the autograd of partial RoPE.

Checks on shapes and dtypes run in C++ for every backend. Checks that must
read index tensors (slot, block and frequency ranges) run in C++ on CPU; for
CUDA tensors they run here, on the host, unless the call is being traced by
torch.compile or captured into a CUDA graph (where reading data would sync);
the CUDA kernels then skip out-of-range slots rather than write outside the
cache.

On CUDA, attention runs on a decode kernel chosen by name: "auto" (the
tensor-core kernel where it applies, else the FMA kernel), "fma", or one
tensor-core configuration (decode_kernel_names()). MLA_DECODE_KERNEL sets the
choice, read once at the first CUDA attention call; decode_kernel() changes it
for a block of calls (tests, benchmarks).
"""
import contextlib
from typing import Iterator, List, Optional, Tuple

import torch

from .cache_format import is_quantized, quantized_row_layout

_ops = torch.ops.mla_cuda
_WITH_CUDA: dict = {}  # cached build fact


# ---------------------------------------------------------------------------
# fake (meta) kernels: output shapes and dtypes only
@torch.library.register_fake("mla_cuda::latent_cache_append")
def _append_fake(c_kv, k_rope, latent_cache, slot_mapping, positions=None, rope_freq_idx=None, inv_freq=None):
    return None


@torch.library.register_fake("mla_cuda::partial_rope")
def _rope_fake(q, k, positions, rope_freq_idx, inv_freq, inverse=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("mla_cuda::partial_rope_")
def _rope_inplace_fake(q, k, positions, rope_freq_idx, inv_freq, inverse=False):
    return None


@torch.library.register_fake("mla_cuda::mla_attention")
def _attention_fake(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, num_splits=0):
    B, Q, H, _ = q_latent.shape
    return torch.empty_like(q_latent), q_latent.new_empty((B, Q, H), dtype=torch.float32)


@torch.library.register_fake("mla_cuda::latent_cache_append_quantized")
def _append_quantized_fake(c_kv, k_rope, latent_cache, slot_mapping, cache_format, positions=None,
                           rope_freq_idx=None, inv_freq=None):
    return None


@torch.library.register_fake("mla_cuda::mla_attention_quantized")
def _attention_quantized_fake(q_latent, q_rope, latent_cache, block_table, seq_lens, scale, cache_format,
                              kv_heads=1):
    B, Q, H, _ = q_latent.shape
    return torch.empty_like(q_latent), q_latent.new_empty((B, Q, H), dtype=torch.float32)


# ---------------------------------------------------------------------------
# autograd of partial RoPE: a rotation's backward is the inverse rotation
def _rope_setup_context(ctx, inputs, output):
    _, _, positions, rope_freq_idx, inv_freq, inverse = inputs
    ctx.save_for_backward(positions, rope_freq_idx, inv_freq)
    ctx.inverse = inverse


def _rope_backward(ctx, grad_q, grad_k):
    positions, rope_freq_idx, inv_freq = ctx.saved_tensors
    gq, gk = _ops.partial_rope(grad_q, grad_k, positions, rope_freq_idx, inv_freq, not ctx.inverse)
    return gq, gk, None, None, None, None


torch.library.register_autograd("mla_cuda::partial_rope", _rope_backward, setup_context=_rope_setup_context)


# ---------------------------------------------------------------------------
# host-side checks
def _may_read_data(t: torch.Tensor, validate: bool = True) -> bool:
    """True when reading index data here is allowed and useful: validation
    asked for, a CUDA tensor, not under torch.compile tracing nor CUDA-graph
    capture (CPU kernels check indices themselves)."""
    if not validate or t.device.type != "cuda":
        return False
    if torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


_NO_CUDA_KERNELS = (
    "mla_cuda was built without CUDA kernels (CPU torch, no nvcc, or MLA_SKIP_CUDA=1); "
    "rebuild with a CUDA torch and CUDA_HOME set: pip install --no-build-isolation ."
)


def _cuda_built() -> bool:
    from ._loader import build_info

    return _WITH_CUDA.setdefault("v", build_info()["with_cuda"])


def _check_cuda_built(t: torch.Tensor) -> None:
    if t.device.type == "cuda" and not _cuda_built():
        raise RuntimeError(_NO_CUDA_KERNELS)


def _as_index(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mla_cuda: {name} must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"mla_cuda: {name} must hold integers, got {t.dtype}")
    return t if t.dtype == dtype else t.to(dtype)


def _cache_format_of(latent_cache: torch.Tensor, cache_format: Optional[str]) -> Optional[str]:
    """The quantized format a call runs on, or None for a floating cache."""
    if cache_format is None:
        if latent_cache.dtype == torch.uint8:
            raise ValueError("mla_cuda: latent_cache is uint8, a quantized cache: pass its cache_format "
                             "('fp8', 'int4', ...), as PagedLatentCache.cache_format holds it")
        return None
    if not is_quantized(cache_format):
        quantized_row_layout(cache_format, 1, 0, torch.float32)  # raises the one-line list of formats
    if latent_cache.dtype != torch.uint8:
        raise ValueError(f"mla_cuda: cache_format {cache_format!r} needs a uint8 latent_cache, got "
                         f"{latent_cache.dtype}; allocate it with PagedLatentCache(cache_format={cache_format!r})")
    return cache_format


def _infer_kv_heads(q_latent, q_rope, latent_cache, cache_format: str) -> int:
    """n_kv of a quantized cache from its row width; the zero padding can
    make several fit, which is then an error asking for kv_heads."""
    n_h, R, rope2 = q_latent.shape[-2], q_latent.shape[-1], q_rope.shape[-1]
    if latent_cache.dim() != 3 or R <= 0:
        return 1
    try:
        fits = [n for n in range(1, n_h + 1) if n_h % n == 0 and quantized_row_layout(
            cache_format, R, rope2, q_latent.dtype, n).row_bytes == latent_cache.shape[-1]]
    except ValueError:
        return 1  # the op names the bad format or group
    if len(fits) > 1:
        raise ValueError(f"mla_cuda: a {latent_cache.shape[-1]}-byte {cache_format!r} row fits {fits} rope keys; "
                         "pass kv_heads")
    return fits[0] if fits else 1


def _check_freq_idx(rope_freq_idx: torch.Tensor, inv_freq: torch.Tensor, validate: bool = True) -> None:
    if rope_freq_idx.numel() and _may_read_data(rope_freq_idx, validate):
        lo, hi = int(rope_freq_idx.min()), int(rope_freq_idx.max())
        if lo < 0 or hi >= inv_freq.shape[0]:
            raise ValueError(
                f"mla_cuda: rope_freq_idx holds values in [{lo}, {hi}], outside [0, {inv_freq.shape[0]})"
            )


# ---------------------------------------------------------------------------
# public functions
def latent_cache_append(
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    rope_freq_idx: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    validate: bool = True,
    cache_format: Optional[str] = None,
) -> None:
    """Write the latent and rope keys of T tokens into the paged cache.

    Args:
      c_kv: [T, R] latent of each token (rows contiguous).
      k_rope: [T, n_kv, 2r] rope keys, per head r first halves then r
        second halves; rotated already unless positions are given.
      latent_cache: [num_blocks, block_size, R + n_kv*2r], written in place.
      slot_mapping: [T] int64 flat slot (block * block_size + offset) of each
        token; negative means skip (padding).
      positions, rope_freq_idx, inv_freq: optional [T] int64, [n_kv, r] int64
        and [d_h/2] float32: rotate k_rope by RoPE on the way in (fused).
      validate: on CUDA, check slot and frequency ranges on the host first
        (one device sync). Hot loops that build their own indices pass
        False; the kernel then skips out-of-range slots.
      cache_format: None for a floating cache (c_kv's dtype); "fp8", "int4"
        or "<kind>-g<N>" for a uint8 quantized cache, whose rows are then
        [latent codes | scales | rope keys in c_kv's dtype | pad]
        (quantized as written; mla_cuda.cache_format).
    """
    _check_cuda_built(latent_cache)
    cache_format = _cache_format_of(latent_cache, cache_format)
    slot_mapping = _as_index(slot_mapping, torch.int64, "slot_mapping")
    if positions is not None:
        positions = _as_index(positions, torch.int64, "positions")
    if rope_freq_idx is not None:
        rope_freq_idx = _as_index(rope_freq_idx, torch.int64, "rope_freq_idx")
        if inv_freq is not None:
            _check_freq_idx(rope_freq_idx, inv_freq, validate)
    if slot_mapping.numel() and latent_cache.dim() == 3 and _may_read_data(slot_mapping, validate):
        num_slots = latent_cache.shape[0] * latent_cache.shape[1]
        hi = int(slot_mapping.max())
        if hi >= num_slots:
            raise ValueError(f"mla_cuda: slot_mapping holds {hi}, out of range for a cache of {num_slots} slots")
    if cache_format is not None:
        _ops.latent_cache_append_quantized(c_kv, k_rope, latent_cache, slot_mapping, cache_format, positions,
                                           rope_freq_idx, inv_freq)
    else:
        _ops.latent_cache_append(c_kv, k_rope, latent_cache, slot_mapping, positions, rope_freq_idx, inv_freq)


def _flatten_rope_args(q, k, positions):
    if q.dim() < 3 or k.dim() != q.dim():
        raise ValueError(
            f"mla_cuda: q and k must be [..., heads, 2r] with the same leading dims, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or tuple(positions.shape) != tuple(lead):
        raise ValueError(
            f"mla_cuda: q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} "
            "must share their leading (token) dims"
        )
    # an expanded positions tensor (one position broadcast over a batch) reshapes to a stride-0 view
    return lead, q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]), positions.reshape(-1).contiguous()


def partial_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rope_freq_idx: torch.Tensor,
    inv_freq: torch.Tensor,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate the rope dims of q and k; returns new tensors (differentiable).

    Args:
      q: [..., n_h, 2r] and k: [..., n_kv, 2r], per head the r first halves
        then the r second halves; pair (j, j+r) of a head of KV head g turns
        by positions * inv_freq[rope_freq_idx[g, j]]. Query head h uses KV
        head h // (n_h // n_kv).
      positions: [...] int64, the leading dims of q and k.
      rope_freq_idx: [n_kv, r] int64 frequency indices into inv_freq.
      inv_freq: [d_h/2] float32 inverse frequencies of the model's RoPE.
      validate: on CUDA, check the frequency indices on the host first (one
        device sync); model code that built the table itself passes False.
    """
    _check_cuda_built(q)
    positions = _as_index(positions, torch.int64, "positions")
    rope_freq_idx = _as_index(rope_freq_idx, torch.int64, "rope_freq_idx")
    _check_freq_idx(rope_freq_idx, inv_freq, validate)
    lead, q2, k2, p2 = _flatten_rope_args(q, k, positions)
    q_out, k_out = _ops.partial_rope(q2, k2, p2, rope_freq_idx, inv_freq, False)
    return q_out.reshape(*lead, *q.shape[-2:]), k_out.reshape(*lead, *k.shape[-2:])


def partial_rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rope_freq_idx: torch.Tensor,
    inv_freq: torch.Tensor,
    inverse: bool = False,
    validate: bool = True,
) -> None:
    """In-place partial RoPE; q and k as in partial_rope, [T, heads, 2r]
    views whose last dim is contiguous (token and head strides are free, so
    a slice of a fused projection output can be rotated where it lies).
    inverse=True turns back (by the negative angle). validate as in
    partial_rope."""
    _check_cuda_built(q)
    positions = _as_index(positions, torch.int64, "positions")
    rope_freq_idx = _as_index(rope_freq_idx, torch.int64, "rope_freq_idx")
    _check_freq_idx(rope_freq_idx, inv_freq, validate)
    _ops.partial_rope_(q, k, positions, rope_freq_idx, inv_freq, inverse)


def attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    num_splits: int = 0,
    validate: bool = True,
    cache_format: Optional[str] = None,
    kv_heads: Optional[int] = None,
):
    """Absorbed MLA attention over the paged latent cache.

    Args:
      q_latent: [B, n_h, R] (decode) or [B, Q, n_h, R] (Q new tokens per
        sequence, causal among them): W_uk^T q_nope of each head.
      q_rope: [B, n_h, 2r] or [B, Q, n_h, 2r], already rotated.
      latent_cache: [num_blocks, block_size, R + n_kv*2r].
      block_table: [B, max_blocks] int32 block ids of each sequence.
      seq_lens: [B] int32 tokens in the cache per sequence, the Q new ones
        included (query i sits at position seq_len - Q + i).
      scale: softmax scale, 1/sqrt(d_h) of the original head dim.
      return_lse: also return the natural-log log-sum-exp [B, (Q,) n_h] f32.
      num_splits: 0 lets the kernel choose the flash-decoding split.
      validate: on CUDA, check seq_lens against the block table and block ids
        against the cache on the host first (one device sync). Hot loops pass
        False; the kernel then reads out-of-range entries as NaN rows.
      cache_format: None for a floating cache; the format of a uint8
        quantized cache ("fp8", "int4", "<kind>-g<N>"), whose rows are
        dequantized as they are read (the rope keys are in q's dtype).
      kv_heads: rope keys per quantized row (n_kv); by default the one count
        the row width fits. num_splits does not apply to quantized caches.
    Returns:
      out_latent [B, (Q,) n_h, R] in q's dtype (then apply W_uv and W_o),
      and the LSE when return_lse.
    """
    _check_cuda_built(q_latent)
    cache_format = _cache_format_of(latent_cache, cache_format)
    decode = q_latent.dim() == 3
    if decode:
        q_latent, q_rope = q_latent.unsqueeze(1), q_rope.unsqueeze(1)
    block_table = _as_index(block_table, torch.int32, "block_table")
    seq_lens = _as_index(seq_lens, torch.int32, "seq_lens")
    if seq_lens.numel() and latent_cache.dim() == 3 and _may_read_data(seq_lens, validate):
        _check_attention_indices(q_latent.shape[1], latent_cache, block_table, seq_lens)
    if cache_format is not None:
        if kv_heads is None:
            kv_heads = _infer_kv_heads(q_latent, q_rope, latent_cache, cache_format)
        out, lse = _ops.mla_attention_quantized(q_latent, q_rope, latent_cache, block_table, seq_lens, float(scale),
                                                cache_format, int(kv_heads))
    else:
        out, lse = _ops.mla_attention(q_latent, q_rope, latent_cache, block_table, seq_lens, float(scale),
                                      num_splits)
    if decode:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def _check_attention_indices(Q, latent_cache, block_table, seq_lens):
    num_blocks, block_size = latent_cache.shape[0], latent_cache.shape[1]
    capacity = block_table.shape[1] * block_size
    lens = seq_lens.cpu()
    if int(lens.max()) > capacity:
        raise ValueError(
            f"mla_cuda: seq_lens holds {int(lens.max())}, over the block table's capacity of {capacity} tokens"
        )
    if int(lens.min()) < 0 or (Q > 1 and int(lens.min()) < Q):
        raise ValueError(f"mla_cuda: every seq_len must be >= the {Q} query tokens, got min {int(lens.min())}")
    used = (lens.to(block_table.device) + block_size - 1) // block_size
    mask = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < used[:, None]
    ids = block_table[mask]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(
            f"mla_cuda: block_table holds ids in [{int(ids.min())}, {int(ids.max())}], "
            f"outside the cache's {num_blocks} blocks"
        )


# ---------------------------------------------------------------------------
# decode kernel of CUDA attention, by name
def _cuda_library():
    if not _cuda_built():
        raise RuntimeError(_NO_CUDA_KERNELS)
    from . import _C

    return _C


def decode_kernel_names() -> List[str]:
    """The names a decode kernel of CUDA attention is chosen by: "auto",
    "fma", then the tensor-core configurations in the order "auto" tries
    them."""
    return list(_cuda_library().decode_kernel_names())


@contextlib.contextmanager
def decode_kernel(name: str) -> Iterator[None]:
    """Run the CUDA attention calls inside the block on the decode kernel
    `name` (one of decode_kernel_names()), then restore the previous choice.
    A tensor-core configuration that does not hold a call's shape leaves that
    call to the FMA kernel, as "auto" does. A CUDA graph keeps the kernel it
    was captured with. An unknown name raises RuntimeError listing the valid
    ones."""
    lib = _cuda_library()
    before = lib.decode_kernel()
    lib.set_decode_kernel(name)
    try:
        yield
    finally:
        lib.set_decode_kernel(before)
