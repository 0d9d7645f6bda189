"""Independent float64 references of the three op families, written from
docs/ops.md with plain PyTorch (no mla_cuda code)."""
import math

import torch

# Relative-error tolerances per dtype: ||out - ref|| / ||ref||. Inputs are
# rounded to the dtype before the reference sees them, so these bound the
# kernels' accumulation and output rounding only.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# float32 attention over long, wide rows (thousands of tokens, 500+ products
# a score): rounding alone lands above TOL[float32]; the CPU reference kernel
# measures 7.7e-6 (fp8) and 9.3e-6 (int4) at 32 heads, R=512, 5000 tokens
# (test_quantized_cache.py pins it), a wrong kernel lands at 1e-3 and up.
LONG_FLOAT32_TOL = 3e-5


def check_attention(out, lse, ref_out, ref_lse, dtype, tol=None):
    """Attention outputs within the dtype's tolerance (or `tol`) of the
    reference, and the log-sum-exp finite exactly where the reference's is,
    and close there."""
    tol = TOL[dtype] if tol is None else tol
    assert rel_err(out, ref_out) <= tol, rel_err(out, ref_out)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-5)


def rope_ref(x, positions, freq_idx, inv_freq, group, inverse=False):
    """x [T, H, 2r]; head h uses frequencies of KV head h // group."""
    x = x.double()
    T, H, two_r = x.shape
    r = two_r // 2
    g = torch.arange(H, device=x.device) // group
    freqs = inv_freq.float()[freq_idx.long()][g]  # [H, r]
    # The angle is rounded to float32 as transformers' rotary embedding does
    # (position.float() * inv_freq); cos and sin of it are taken in float64.
    angle = (positions.float()[:, None, None] * freqs[None]).double()  # [T, H, r]
    if inverse:
        angle = -angle
    c, s = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :r], x[..., r:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def append_ref(cache, c_kv, k_rope, slots, positions=None, rope_freq_idx=None, inv_freq=None):
    """Returns a float64 copy of cache with the rows written."""
    out = cache.double().clone().reshape(-1, cache.shape[-1])
    if positions is not None:
        k_rope = rope_ref(k_rope, positions, rope_freq_idx, inv_freq, 1)
    rows = torch.cat([c_kv.double(), k_rope.double().flatten(1)], dim=1)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[s] = rows[t]
    return out.reshape(cache.shape)


def attention_ref(q_latent, q_rope, cache, block_table, seq_lens, scale):
    """q_latent [B, Q, H, R], q_rope [B, Q, H, 2r] -> (out, lse) float64."""
    B, Q, H, R = q_latent.shape
    dev = q_latent.device
    two_r = q_rope.shape[-1]
    n_kv = (cache.shape[-1] - R) // two_r
    group = H // n_kv
    bs = cache.shape[1]
    out = torch.zeros(B, Q, H, R, dtype=torch.float64, device=dev)
    lse = torch.full((B, Q, H), -math.inf, dtype=torch.float64, device=dev)
    seq_lens = seq_lens.cpu()
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        t = torch.arange(L, device=dev)
        rows = cache[block_table[b, t // bs].long(), t % bs].double()  # [L, D]
        c = rows[:, :R]
        k_rope = rows[:, R:].reshape(L, n_kv, two_r)[:, torch.arange(H, device=dev) // group]  # [L, H, 2r]
        s = torch.einsum("qhr,lr->qhl", q_latent[b].double(), c)
        s = s + torch.einsum("qhr,lhr->qhl", q_rope[b].double(), k_rope)
        s = s * scale
        q_pos = L - Q + torch.arange(Q, device=dev)
        s = s.masked_fill(t[None, None, :] > q_pos[:, None, None], -math.inf)
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.einsum("qhl,lr->qhr", torch.softmax(s, dim=-1), c)
    return out, lse


# ---- quantized caches, written from docs/ops.md "Quantized caches" ----------
def _align(x, a):
    return -(-x // a) * a


def quant_layout_ref(kind, R, group, rope_bytes):
    """(code_bytes, scale_offset, rope_offset, row_bytes) of a quantized row."""
    code_bytes = R if kind == "fp8" else R // 2
    scale_offset = _align(code_bytes, 4)
    rope_offset = scale_offset + 4 * (R // group)
    return code_bytes, scale_offset, rope_offset, _align(rope_offset + rope_bytes, 16)


def quantize_rows_ref(kind, group, c_kv, k_rope):
    """uint8 rows [T, row_bytes] of tokens c_kv [T, R], k_rope [T, n_kv, 2r]
    (already rotated, stored in k_rope's dtype): codes of x * (max / amax)
    rounded to nearest even, float32 scales amax / max per group of channels,
    zero bytes elsewhere."""
    T, R = c_kv.shape
    rope = k_rope.contiguous().view(torch.uint8).reshape(T, -1)
    code_bytes, scale_off, rope_off, row_bytes = quant_layout_ref(kind, R, group, rope.shape[1])
    x = c_kv.float().reshape(T, R // group, group)
    amax = x.abs().amax(-1, keepdim=True)  # NaN propagates, as in the kernels
    top = 448.0 if kind == "fp8" else 7.0
    scale = amax / top
    # a true division (a number / tensor in torch multiplies by the reciprocal)
    inv = torch.where(amax > 0, torch.full_like(amax, top) / amax, torch.zeros_like(amax))
    v = (x * inv).clamp(-top, top).reshape(T, R)
    if kind == "fp8":
        codes = v.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        q = (torch.round(v).to(torch.int16) & 0xF).to(torch.uint8)
        codes = q[:, 0::2] | (q[:, 1::2] << 4)
    rows = torch.zeros(T, row_bytes, dtype=torch.uint8)
    rows[:, :code_bytes] = codes
    rows[:, scale_off:rope_off] = scale.reshape(T, -1).contiguous().view(torch.uint8)
    rows[:, rope_off : rope_off + rope.shape[1]] = rope
    return rows


def dequantize_rows_ref(kind, group, R, rows, rope_dtype, rope_dim):
    """float64 [..., R + rope_dim]: the values a quantized row stands for in
    attention with queries of rope_dtype: code x scale, and for rows with
    several scales (group < R) that product (float32) rounded to a 16-bit
    rope_dtype."""
    lead = rows.shape[:-1]
    rows = rows.reshape(-1, rows.shape[-1])
    esize = torch.empty((), dtype=rope_dtype).element_size()
    code_bytes, scale_off, rope_off, _ = quant_layout_ref(kind, R, group, rope_dim * esize)
    codes = rows[:, :code_bytes]
    if kind == "fp8":
        vals = codes.contiguous().view(torch.float8_e4m3fn).double()
    else:
        nib = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(-1, R).to(torch.int16)
        vals = torch.where(nib >= 8, nib - 16, nib).double()
    scale = rows[:, scale_off:rope_off].contiguous().view(torch.float32).double()
    c = (vals.reshape(-1, R // group, group) * scale[:, :, None]).reshape(-1, R)
    if group < R and rope_dtype != torch.float32:
        c = c.float().to(rope_dtype).double()
    rope = rows[:, rope_off : rope_off + rope_dim * esize].contiguous().view(rope_dtype).double()
    return torch.cat([c, rope], dim=1).reshape(*lead, R + rope_dim)
