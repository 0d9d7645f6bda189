"""The quantized latent-cache ops (fp8 and int4 rows, docs/ops.md
"Quantized caches") against independent references (tests/reference.py):
the append writes exactly the reference bytes, the codes stand for values
within the format's rounding, and attention equals a float64 reference that
dequantizes the same rows."""
import math

import pytest
import torch
from conftest import DTYPES
from op_inputs import make_paged_cache, make_queries, make_rope_tables
from reference import (LONG_FLOAT32_TOL, TOL, attention_ref, check_attention, dequantize_rows_ref, quant_layout_ref, quantize_rows_ref,
                       rel_err, rope_ref)

import mla_cuda
from mla_cuda.cache_format import quantized_row_layout

FORMATS = [("fp8", None), ("int4", None), ("int4", 4), ("fp8", 4)]  # (kind, group; None = per token)


def _name(kind, group):
    return kind if group is None else f"{kind}-g{group}"


def _row_bytes(kind, group, R, rope_dim, dtype):
    return quant_layout_ref(kind, R, group or R, rope_dim * torch.empty((), dtype=dtype).element_size())[3]


def _append_inputs(T, R, n_kv, r, num_blocks, block_size, kind, group, dtype):
    row = _row_bytes(kind, group, R, n_kv * 2 * r, dtype)
    cache = torch.randint(0, 256, (num_blocks, block_size, row), dtype=torch.uint8)  # garbage, never zeros
    c_kv = (torch.randn(T, R) * torch.logspace(0, -2, R)).to(dtype)  # decaying channels, like an SVD latent
    k_rope = torch.randn(T, n_kv, 2 * r).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:T]
    return cache, c_kv, k_rope, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("T,R,n_kv,r,block_size", [(1, 96, 1, 4, 16), (37, 40, 3, 1, 1), (65, 2048, 1, 8, 64)])
def test_append_writes_reference_bytes(dtype, kind, group, T, R, n_kv, r, block_size):
    cache, c_kv, k_rope, slots = _append_inputs(T, R, n_kv, r, T // block_size + 3, block_size, kind, group, dtype)
    if T > 2:
        slots[1] = -1  # padding: not written
    before = cache.clone()
    mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots, cache_format=_name(kind, group))
    rows = quantize_rows_ref(kind, group or R, c_kv, k_rope)
    flat, flat_before = cache.view(-1, cache.shape[-1]), before.view(-1, cache.shape[-1])
    written = torch.zeros(flat.shape[0], dtype=torch.bool)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], rows[t]), f"token {t}"
            written[s] = True
    assert torch.equal(flat[~written], flat_before[~written])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,group", FORMATS[:2])
def test_append_fused_rope(dtype, kind, group):
    """Codes and scales are exact; the rotated rope keys are within the
    dtype's rounding of a float64 rotation."""
    T, R, n_kv, r = 9, 24, 2, 3
    cache, c_kv, k_rope, slots = _append_inputs(T, R, n_kv, r, 4, 4, kind, group, dtype)
    freq_idx, inv_freq = make_rope_tables(n_kv, r, 16)
    positions = torch.randint(0, 5000, (T,))
    mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots, positions, freq_idx, inv_freq, cache_format=kind)
    rows = cache.view(-1, cache.shape[-1])[slots]
    rotated = rope_ref(k_rope, positions, freq_idx, inv_freq, 1)
    want = quantize_rows_ref(kind, R, c_kv, rotated.to(dtype))
    rope_off = quant_layout_ref(kind, R, R, 0)[2]
    assert torch.equal(rows[:, :rope_off], want[:, :rope_off])
    got = dequantize_rows_ref(kind, R, R, rows, dtype, n_kv * 2 * r)[:, R:]
    assert rel_err(got, rotated.flatten(1)) <= TOL[dtype]


@pytest.mark.parametrize("kind,group", FORMATS)
def test_round_trip_error_bounds(kind, group):
    """fp8 e4m3 keeps 3 mantissa bits: |x^ - x| <= |x|/16 + 2^-10 scale
    (the last term: codes below e4m3's normal range); int4: |x^ - x| <=
    scale / 2. An all-zero group comes back as zeros."""
    T, R = 200, 64
    c_kv = torch.randn(T, R) * torch.logspace(1, -3, R)
    c_kv[3] = 0.0
    g = group or R
    rows = quantize_rows_ref(kind, g, c_kv, torch.zeros(T, 1, 2))
    cache = torch.zeros(T, 1, rows.shape[1], dtype=torch.uint8)
    mla_cuda.latent_cache_append(c_kv, torch.zeros(T, 1, 2), cache, torch.arange(T), cache_format=_name(kind, group))
    assert torch.equal(cache[:, 0], rows)
    back = dequantize_rows_ref(kind, g, R, cache[:, 0], torch.float32, 2)[:, :R]
    x = c_kv.double()
    scale = (x.reshape(T, -1, g).abs().amax(-1, keepdim=True) / (448 if kind == "fp8" else 7)).expand(-1, -1, g)
    scale = scale.reshape(T, R)
    bound = x.abs() / 16 + scale * 2**-10 if kind == "fp8" else scale / 2
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (back[3] == 0).all()
    # the group's largest value comes back exactly (its code is the top one)
    top = x.reshape(T, -1, g).abs().argmax(-1, keepdim=True)
    xs, bs = x.reshape(T, -1, g).gather(-1, top), back.reshape(T, -1, g).gather(-1, top)
    assert torch.allclose(xs, bs, rtol=1e-6, atol=0)


def _quantized_paged_cache(seq_lens, R, n_kv, r, block_size, kind, group, dtype):
    """make_paged_cache's layout and values, quantized by the reference;
    unused rows hold 0xFF bytes (NaN codes, NaN scales, NaN rope keys)."""
    fcache, table = make_paged_cache(seq_lens, R, n_kv, r, block_size, dtype)
    flat = fcache.reshape(-1, fcache.shape[-1])
    unused = torch.isnan(flat).any(1)
    k_rope = flat[:, R:].reshape(-1, n_kv, 2 * r)
    rows = quantize_rows_ref(kind, group or R, torch.nan_to_num(flat[:, :R]), torch.nan_to_num(k_rope))
    rows[unused] = 0xFF
    return rows.reshape(*fcache.shape[:2], -1), table


def run_quantized_case(seq_lens, Q, H, R, n_kv, r, block_size, kind, group, dtype, device="cpu"):
    cache, table = _quantized_paged_cache(seq_lens, R, n_kv, r, block_size, kind, group, dtype)
    q_latent, q_rope = make_queries(len(seq_lens), Q, H, R, r, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(2 * R / H + 1)
    values = dequantize_rows_ref(kind, group or R, R, cache, dtype, n_kv * 2 * r)
    ref_out, ref_lse = attention_ref(q_latent, q_rope, values, table, lens, scale)
    q_in, r_in = (q_latent[:, 0], q_rope[:, 0]) if Q == 1 else (q_latent, q_rope)
    out, lse = mla_cuda.attention(q_in.to(device), r_in.to(device), cache.to(device), table.to(device),
                                  lens.to(device), scale, return_lse=True, cache_format=_name(kind, group),
                                  kv_heads=n_kv)
    if Q == 1:
        out, lse = out.unsqueeze(1), lse.unsqueeze(1)
    assert out.dtype == dtype and lse.dtype == torch.float32
    return out.cpu(), lse.cpu(), ref_out, ref_lse


# SmolLM2-135M converted (9 heads sharing one rope key, R=96 at d_kv=32),
# an odd shape, GQA-style several rope keys, block sizes 1/16/64.
QCASES = [
    dict(seq_lens=[1, 17, 300], H=9, R=96, n_kv=1, r=4, block_size=16),
    dict(seq_lens=[5, 1], H=4, R=40, n_kv=1, r=1, block_size=1),
    dict(seq_lens=[64, 3, 129], H=8, R=52, n_kv=4, r=2, block_size=64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("case", QCASES)
def test_attention_matches_dequantizing_reference(dtype, kind, group, case):
    check_attention(*run_quantized_case(Q=1, kind=kind, group=group, dtype=dtype, **case), dtype)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_attention_multi_token_long_and_empty(kind):
    check_attention(*run_quantized_case([7, 40, 4], Q=4, H=6, R=24, n_kv=2, r=2, block_size=16,
                                        kind=kind, group=None, dtype=torch.float32), torch.float32)
    check_attention(*run_quantized_case([1500, 0, 1], Q=1, H=3, R=16, n_kv=1, r=2, block_size=16,
                                        kind=kind, group=None, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_float32_rounding_over_long_wide_rows(kind):
    """What float32 arithmetic alone costs at 32 heads, R=512, 5000 tokens
    (7.7e-6 and 9.3e-6 here, above TOL[float32]): well within
    LONG_FLOAT32_TOL, the GPU tests' float32 bound at these sizes."""
    out, lse, ref_out, ref_lse = run_quantized_case([5000], Q=1, H=32, R=512, n_kv=1, r=8, block_size=16, kind=kind,
                                                    group=None, dtype=torch.float32)
    assert rel_err(out, ref_out) <= LONG_FLOAT32_TOL / 2
    check_attention(out, lse, ref_out, ref_lse, torch.float32, tol=LONG_FLOAT32_TOL)


def test_reference_sees_a_wrong_row():
    """A corrupted code of a used row must fail the comparison."""
    cache, table = _quantized_paged_cache([10], 16, 1, 2, 4, "int4", None, torch.float32)
    q_latent, q_rope = make_queries(1, 1, 2, 16, 2, torch.float32)
    lens = torch.tensor([10], dtype=torch.int32)
    values = dequantize_rows_ref("int4", 16, 16, cache, torch.float32, 4)
    ref, _ = attention_ref(q_latent, q_rope, values, table, lens, 0.3)
    cache[table[0, 1], 2, :8] ^= 0x77
    out = mla_cuda.attention(q_latent[:, 0], q_rope[:, 0], cache, table, lens, 0.3, cache_format="int4")
    assert rel_err(out.unsqueeze(1), ref) > TOL[torch.float32]


def test_layout_matches_the_kernels():
    """mla_cuda.cache_format's layout is the one the ops accept: R=96 with 8
    rope values in bf16 (16 bytes)."""
    for name, row in [("fp8", 128), ("int4", 80), ("int4-g32", 80), ("fp8-g8", 160)]:
        layout = quantized_row_layout(name, 96, 8, torch.bfloat16)
        assert layout.row_bytes == row and layout.row_bytes % 16 == 0
        cache = torch.zeros(2, 4, row, dtype=torch.uint8)
        mla_cuda.latent_cache_append(torch.randn(3, 96).bfloat16(), torch.randn(3, 1, 8).bfloat16(), cache,
                                     torch.arange(3), cache_format=name)
        with pytest.raises(RuntimeError, match="bytes"):
            mla_cuda.latent_cache_append(torch.randn(3, 96).bfloat16(), torch.randn(3, 1, 8).bfloat16(),
                                         torch.zeros(2, 4, row + 16, dtype=torch.uint8), torch.arange(3),
                                         cache_format=name)


def test_opcheck():
    cache, table = _quantized_paged_cache([5, 9], 12, 2, 2, 4, "fp8", None, torch.float32)
    for fmt in ["fp8", "int4"]:
        row = _row_bytes(fmt, None, 12, 8, torch.float32)
        c = torch.zeros(4, 4, row, dtype=torch.uint8)
        torch.library.opcheck(torch.ops.mla_cuda.latent_cache_append_quantized,
                              (torch.randn(5, 12), torch.randn(5, 2, 4), c, torch.arange(5), fmt))
        freq_idx, inv_freq = make_rope_tables(2, 2, 16)
        torch.library.opcheck(torch.ops.mla_cuda.latent_cache_append_quantized,
                              (torch.randn(5, 12), torch.randn(5, 2, 4), c, torch.arange(5), fmt, torch.arange(5),
                               freq_idx, inv_freq))
    q_latent, q_rope = make_queries(2, 2, 4, 12, 2, torch.float32)
    torch.library.opcheck(torch.ops.mla_cuda.mla_attention_quantized,
                          (q_latent, q_rope, cache, table, torch.tensor([5, 9], dtype=torch.int32), 0.25, "fp8", 2))


def _good_attention_args():
    cache, table = _quantized_paged_cache([5, 9], 12, 1, 2, 4, "int4", None, torch.float32)
    return dict(q_latent=torch.randn(2, 4, 12), q_rope=torch.randn(2, 4, 4), latent_cache=cache, block_table=table,
                seq_lens=torch.tensor([5, 9], dtype=torch.int32), scale=0.3, cache_format="int4")


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(cache_format=None), ValueError, "uint8, a quantized cache: pass its cache_format"),
        (dict(cache_format="int3"), ValueError, "unknown cache format 'int3'"),
        (dict(cache_format="int4-g5"), RuntimeError, "divide"),
        (dict(cache_format="int4-g2"), RuntimeError,
         "row for R=12 and 1 rope key\\(s\\) of width 4 is 48 bytes, but latent_cache rows are 32"),
        (dict(q_latent=torch.randn(2, 4, 12).double(), q_rope=torch.randn(2, 4, 4).double()), RuntimeError,
         "float32, float16 or bfloat16"),
        (dict(q_rope=torch.randn(2, 4, 4).half()), RuntimeError, "q_rope .* must have q_latent's dtype"),
        (dict(latent_cache=torch.zeros(3, 4, 16)), ValueError, "needs a uint8 latent_cache"),
        (dict(seq_lens=torch.tensor([5, 400], dtype=torch.int32)), RuntimeError, "capacity"),
        (dict(block_table=torch.full((2, 4), 99, dtype=torch.int32)), RuntimeError, "outside"),
        (dict(kv_heads=3), RuntimeError, "multiple of kv_heads=3"),
    ],
)
def test_attention_bad_input(kw, error, match):
    args = _good_attention_args()
    args.update(kw)
    with pytest.raises(error, match=match):
        mla_cuda.attention(**args)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(cache_format=None), ValueError, "pass its cache_format"),
        (dict(cache_format="int4", c_kv=torch.randn(3, 15)), RuntimeError, "even"),
        (dict(latent_cache=torch.zeros(4, 4, 32, dtype=torch.float32)), ValueError, "uint8"),
        (dict(slot_mapping=torch.tensor([0, 10**6, 2])), RuntimeError, "out of range"),
        (dict(c_kv=torch.randn(3, 16).half()), RuntimeError, "k_rope .* must have c_kv's dtype"),
        (dict(c_kv=torch.randn(3, 16).to(torch.float64), k_rope=torch.randn(3, 1, 4).double()), RuntimeError,
         "float32, float16 or bfloat16"),
        (dict(latent_cache=torch.zeros(4, 4, 48, dtype=torch.uint8)), RuntimeError, "bytes"),
    ],
)
def test_append_bad_input_raises_and_leaves_cache(kw, error, match):
    args = dict(c_kv=torch.randn(3, 16), k_rope=torch.randn(3, 1, 4),
                latent_cache=torch.randint(0, 256, (4, 4, 32), dtype=torch.uint8),
                slot_mapping=torch.tensor([0, 5, 2]), cache_format="int4")
    args.update(kw)
    before = args["latent_cache"].clone()
    with pytest.raises(error, match=match):
        mla_cuda.latent_cache_append(**args)
    assert torch.equal(args["latent_cache"], before)


def test_kv_heads_inferred_or_asked_for():
    """n_kv follows from the row width unless the padding fits several."""
    check_attention(*run_quantized_case([9], Q=1, H=4, R=64, n_kv=2, r=4, block_size=4,
                                        kind="fp8", group=None, dtype=torch.float32), torch.float32)
    args = _good_attention_args()  # 32-byte int4 rows (R=12) fit one or two rope keys of 2 float32
    args.update(q_latent=torch.randn(2, 2, 12), q_rope=torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match="pass kv_heads"):
        mla_cuda.attention(**args)


def test_paged_latent_cache_formats():
    """PagedLatentCache allocates uint8 rows of the format and counts their
    bytes; grow keeps them."""
    for fmt, row in [(None, 208), ("fp8", 128), ("int4", 80)]:
        paged = mla_cuda.PagedLatentCache(3, 4, 16, 96, 8, torch.bfloat16, cache_format=fmt)
        assert paged.bytes_per_token == 3 * row
        assert paged.layers[0].dtype == (torch.bfloat16 if fmt is None else torch.uint8)
        paged.layers[0].fill_(7)
        paged.grow(6)
        assert paged.layers[0].shape[0] == 6 and (paged.layers[0][:4].float() == 7).all()
    with pytest.raises(ValueError, match="unknown cache format"):
        mla_cuda.PagedLatentCache(1, 1, 1, 8, 2, cache_format="nf4")
