"""GPU suite: every CUDA kernel against the float64 reference on the shapes of
SmolLM2, Llama-2-7B and DeepSeek latents, plus validate=False, CUDA-graph
capture and torch.compile. Skipped without a GPU. MLA_GPU_QUICK=1 keeps
only small sizes (for compute-sanitizer).
"""
import math
import os

import pytest
import torch
from cuda_graph import assert_graph_replays_step
from op_inputs import make_paged_cache, make_queries, make_rope_tables
from reference import TOL, append_ref, attention_ref, rel_err, rope_ref

import mla_cuda
from mla_cuda._ops import decode_kernel as decode_kernel_named
from mla_cuda._ops import decode_kernel_names

pytestmark = pytest.mark.gpu
QUICK = os.environ.get("MLA_GPU_QUICK") == "1"
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poison_allocator(nbytes):
    """Fill memory the caching allocator will hand out next with NaN, so an
    output element the kernel forgets to write shows up."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device=DEV)
    del junk


# (name, H, n_kv, d_h-for-scale, R, r)
SHAPES = [
    ("smollm-dkv8", 9, 3, 64, 24, 4),
    ("smollm-dkv16", 9, 3, 64, 48, 4),
    ("smollm-dkv32", 9, 3, 64, 96, 4),
    ("llama7b-dkv16", 32, 32, 128, 512, 8),
    ("llama7b-dkv32", 32, 32, 128, 1024, 8),
    ("llama7b-dkv64", 32, 32, 128, 2048, 8),
    ("deepseek-h16", 16, 1, 192, 512, 32),
    ("deepseek-h128", 128, 1, 192, 512, 32),
    ("llama3-8b-dkv64", 32, 8, 128, 512, 8),
    ("odd-R40-r1", 5, 1, 16, 40, 1),
]
if QUICK:
    SHAPES = [s for s in SHAPES if s[0] in ("smollm-dkv32", "odd-R40-r1", "llama7b-dkv16", "llama7b-dkv32")]


def lens_for(batch, max_len):
    g = torch.Generator().manual_seed(batch * 7 + max_len)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    return lens.tolist()


BATCHES = [(1, 32768), (7, 3000), (64, 700), (256, 130)] if not QUICK else [(1, 700), (5, 130)]
# "auto": the warp-stream kernel for narrow latents, the cooperative
# tensor-core kernel for wide ones (16-bit, rows of whole 16-byte chunks; on
# sm_90 built for sm_90a the Hopper kernel, in a cluster for Llama-2-7B's
# rows); "fma": the FMA kernel forced; "warp_w4_s2_t16_kq16_kn24": the larger
# warp-stream configuration forced (SmolLM2 shapes otherwise take the smaller
# one); "mma_wc4_wt2_kq16_kn16": the cooperative 4 x 2 warp configuration
# forced wherever it holds the shape (test_decode_cooperative_wide_rows
# covers the one GPUs before Hopper run for Llama-2-7B's widest rows);
# "wgmma_g2": the Hopper kernel's two warpgroups forced ("auto" takes its
# one-warpgroup configuration at Llama-3-8B's 32 heads), so every path
# stays covered.
KERNELS = ["auto", "fma", "warp_w4_s2_t16_kq16_kn24", "mma_wc4_wt2_kq16_kn16", "wgmma_g2"]


@pytest.fixture(params=KERNELS)
def decode_kernel(request):
    with decode_kernel_named(request.param):
        yield request.param


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("batch,max_len", BATCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16] if not QUICK else DTYPES)
def test_decode_shapes(shape, batch, max_len, dtype, decode_kernel):
    name, H, n_kv, d_h, R, r = shape
    if batch * max_len * (R + 2 * r * n_kv) > 4e8 or H * batch > 8192:
        pytest.skip("reference too large")
    seq_lens = lens_for(batch, max_len)
    block_size = 1 if name.startswith("odd") and batch > 1 else (128 if name.startswith("odd") else 64)
    cache, table = make_paged_cache(seq_lens, R, n_kv, r, block_size, dtype, DEV)
    q_latent, q_rope = make_queries(batch, 1, H, R, r, dtype, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    scale = 1 / math.sqrt(d_h)
    ref_out, ref_lse = attention_ref(q_latent, q_rope, cache, table, lens, scale)
    poison_allocator(q_latent.numel() * 8 * 64)
    out, lse = mla_cuda.attention(q_latent[:, 0], q_rope[:, 0], cache, table, lens, scale, return_lse=True)
    assert rel_err(out, ref_out[:, 0]) <= TOL[dtype]
    assert torch.allclose(lse.double(), ref_lse[:, 0], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3, 128])
@pytest.mark.parametrize("Q", [1, 4])
def test_decode_forced_splits_and_multi_token(dtype, num_splits, Q, decode_kernel):
    seq_lens = [1 if Q == 1 else Q, 257, 4000, 33]
    cache, table = make_paged_cache(seq_lens, 96, 3, 4, 16, dtype, DEV)
    q_latent, q_rope = make_queries(4, Q, 9, 96, 4, dtype, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ref_out, ref_lse = attention_ref(q_latent, q_rope, cache, table, lens, 0.125)
    poison_allocator(1 << 24)
    out, lse = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125, return_lse=True, num_splits=num_splits)
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert torch.allclose(lse.double(), ref_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("R", [1024, 2048])
@pytest.mark.parametrize("num_splits", [0, 3])
def test_decode_cooperative_wide_rows(R, num_splits):
    """The cooperative kernel's 8-warp configuration at Llama-2-7B's 32 heads
    over rows of 1024 and 2048 latent + 512 rope columns, which "auto" on
    sm_90 leaves to a cluster of the Hopper kernel: what GPUs without it run
    there where their shared memory holds the configuration (an H100 holds
    both rows, an A100 the 1024 one); elsewhere the name falls back to the
    FMA kernel, which must pass too."""
    seq_lens = [1, 700, 3000]
    cache, table = make_paged_cache(seq_lens, R, 32, 8, 64, torch.bfloat16, DEV)
    q_latent, q_rope = make_queries(3, 1, 32, R, 8, torch.bfloat16, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ref_out, ref_lse = attention_ref(q_latent, q_rope, cache, table, lens, 1 / math.sqrt(128))
    poison_allocator(1 << 24)
    with decode_kernel_named("mma_wc8_wt1_kq20_kn32"):
        out, lse = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 1 / math.sqrt(128), return_lse=True,
                                      num_splits=num_splits)
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16]
    assert torch.allclose(lse.double(), ref_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("R", [42, 96, 2048])
@pytest.mark.parametrize("num_splits", [2, 5, 64, 100, 128])
def test_split_merge_row_widths_and_split_counts(R, num_splits):
    """The split merge with rows of whole 4-column groups (R % 4 == 0: one
    16-byte load a thread) and without (R = 42), short rows that leave
    threads idle along the columns, and split counts below and above its 8
    groups of threads over splits: one batch of 8 loads a thread, two, and
    a last batch only partly filled (100). Sequences shorter than a split
    are included (splits with no keys, weight 0, whatever their partial
    holds)."""
    seq_lens = [1, 300, 5000]
    cache, table = make_paged_cache(seq_lens, R, 1, 3, 64, torch.bfloat16, DEV)
    q_latent, q_rope = make_queries(3, 1, 9, R, 3, torch.bfloat16, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ref_out, ref_lse = attention_ref(q_latent, q_rope, cache, table, lens, 0.125)
    poison_allocator(4 * 3 * num_splits * 9 * R * 2)  # twice the partial outputs
    out, lse = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125, return_lse=True, num_splits=num_splits)
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16]
    assert torch.allclose(lse.double(), ref_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("n_kv,R,kernel", [(8, 512, "wgmma_g1"), (8, 512, "wgmma_g2"),
                                            (32, 512, "wgmma_g1_c2"), (32, 2048, "wgmma_g1_c4")])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("Q", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 24, 128])
def test_decode_hopper_configs_splits_and_multi_token(n_kv, R, kernel, num_splits, Q, dtype, block_size):
    """Each Hopper configuration (one or two warpgroups; rows split over a
    cluster of 2 or 4 blocks) at 32 heads, with forced splits, several query
    tokens and a sequence shorter than a tile. Block size 16: a 64-token
    tile is 4 TMA boxes; 128: one box, the split's end inside it; 24: tiles
    straddle blocks, so the threads copy them. Elsewhere than an sm_90 GPU
    the names fall back to the FMA kernel, which must pass too."""
    seq_lens = [Q, 257, 1000, 33]
    cache, table = make_paged_cache(seq_lens, R, n_kv, 8, block_size, dtype, DEV)
    q_latent, q_rope = make_queries(4, Q, 32, R, 8, dtype, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ref_out, ref_lse = attention_ref(q_latent, q_rope, cache, table, lens, 0.09)
    poison_allocator(1 << 24)
    with decode_kernel_named(kernel):
        out, lse = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.09, return_lse=True, num_splits=num_splits)
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert torch.allclose(lse.double(), ref_lse, atol=2e-3, rtol=1e-4)


def test_decode_empty_sequence_and_empty_batch():
    cache, table = make_paged_cache([0, 5], 32, 1, 2, 16, torch.bfloat16, DEV)
    q_latent, q_rope = make_queries(2, 1, 4, 32, 2, torch.bfloat16, DEV)
    lens = torch.tensor([0, 5], dtype=torch.int32, device=DEV)
    out, lse = mla_cuda.attention(q_latent[:, 0], q_rope[:, 0], cache, table, lens, 0.2, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    ref, _ = attention_ref(q_latent, q_rope, cache, table, lens, 0.2)
    assert rel_err(out[1], ref[1, 0]) <= TOL[torch.bfloat16]
    empty = mla_cuda.attention(q_latent[:0, 0], q_rope[:0, 0], cache, table[:0], lens[:0], 0.2)
    assert empty.shape == (0, 4, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_every_kernel_by_name(dtype):
    """Every name decode_kernel_names() lists runs and matches the reference,
    on a SmolLM2-size and a DeepSeek-size shape (a configuration that does
    not hold a shape leaves it to the FMA kernel)."""
    names = decode_kernel_names()
    assert names[:2] == ["auto", "fma"] and len(names) > 2
    for H, n_kv, R, r in [(9, 3, 96, 4), (16, 1, 512, 32)]:
        seq_lens = [700, 1, 130]
        cache, table = make_paged_cache(seq_lens, R, n_kv, r, 64, dtype, DEV)
        q_latent, q_rope = make_queries(3, 1, H, R, r, dtype, DEV)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        ref_out, ref_lse = attention_ref(q_latent, q_rope, cache, table, lens, 0.1)
        for name in names:
            with decode_kernel_named(name):
                out, lse = mla_cuda.attention(q_latent[:, 0], q_rope[:, 0], cache, table, lens, 0.1, return_lse=True)
            assert rel_err(out, ref_out[:, 0]) <= TOL[dtype], name
            assert torch.allclose(lse.double(), ref_lse[:, 0], atol=2e-3, rtol=1e-4), name


# ---- validate: host-side index checks on CUDA, and what validate=False skips ----
def _decode_inputs():
    seq_lens = [100, 37, 260]
    cache, table = make_paged_cache(seq_lens, 96, 3, 4, 16, torch.bfloat16, DEV)
    q_latent, q_rope = make_queries(3, 1, 9, 96, 4, torch.bfloat16, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return q_latent[:, 0].contiguous(), q_rope[:, 0].contiguous(), cache, table, lens


def _append_inputs():
    cache = torch.full((4, 16, 40), float("nan"), device=DEV)
    c_kv = torch.randn(2, 32, device=DEV)
    k_rope = torch.randn(2, 2, 4, device=DEV)
    freq_idx, inv_freq = make_rope_tables(2, 2, 16, DEV)
    return cache, c_kv, k_rope, torch.tensor([3, 17], device=DEV), torch.tensor([5, 6], device=DEV), freq_idx, inv_freq


def test_validate_refuses_out_of_range_indices_on_cuda():
    q_latent, q_rope, cache, table, lens = _decode_inputs()
    bad_table = table.clone()
    bad_table[1, 0] = cache.shape[0]
    with pytest.raises(ValueError, match="outside the cache's"):
        mla_cuda.attention(q_latent, q_rope, cache, bad_table, lens, 0.125)
    too_long = lens.clone()
    too_long[0] = table.shape[1] * cache.shape[1] + 1
    with pytest.raises(ValueError, match="capacity"):
        mla_cuda.attention(q_latent, q_rope, cache, table, too_long, 0.125)
    cache, c_kv, k_rope, slots, pos, freq_idx, inv_freq = _append_inputs()
    with pytest.raises(ValueError, match="out of range"):
        mla_cuda.latent_cache_append(c_kv, k_rope, cache, torch.tensor([3, 64], device=DEV))
    bad_freq = freq_idx.clone()
    bad_freq[0, 0] = inv_freq.shape[0]
    with pytest.raises(ValueError, match="outside"):
        mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots, pos, bad_freq, inv_freq)
    with pytest.raises(ValueError, match="outside"):
        mla_cuda.partial_rope(k_rope.clone(), k_rope.clone(), pos, bad_freq, inv_freq)
    assert torch.isnan(cache).all()


def test_validate_false_same_results_without_host_sync():
    """validate=False skips the host-side checks and so never syncs: under
    sync debug mode "error" the calls go through, while validate=True (which
    reads the indices on the host) is refused."""
    q_latent, q_rope, cache, table, lens = _decode_inputs()
    a_cache, c_kv, k_rope, slots, pos, freq_idx, inv_freq = _append_inputs()
    want_out = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125)
    want_q, want_k = mla_cuda.partial_rope(k_rope, k_rope, pos, freq_idx, inv_freq)
    want_cache = a_cache.clone()
    mla_cuda.latent_cache_append(c_kv, k_rope, want_cache, slots, pos, freq_idx, inv_freq)
    got_cache, q_inplace, k_inplace = a_cache.clone(), k_rope.clone(), k_rope.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125, validate=False)
        got_q, got_k = mla_cuda.partial_rope(k_rope, k_rope, pos, freq_idx, inv_freq, validate=False)
        mla_cuda.partial_rope_(q_inplace, k_inplace, pos, freq_idx, inv_freq, validate=False)
        mla_cuda.latent_cache_append(c_kv, k_rope, got_cache, slots, pos, freq_idx, inv_freq, validate=False)
        with pytest.raises(RuntimeError, match="synchronizing"):
            mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out, want_out)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(q_inplace, want_q) and torch.equal(k_inplace, want_k)
    assert torch.equal(got_cache.nan_to_num(7.0), want_cache.nan_to_num(7.0))


def test_validate_false_kernels_stay_inside_their_tensors():
    """With validate=False the kernels meet bad indices themselves: append
    skips an out-of-range slot, attention reads an out-of-range block as NaN
    rows (that sequence's result is wrong, the others are untouched), and
    neither touches memory outside its tensors."""
    cache, c_kv, k_rope, _, _, _, _ = _append_inputs()
    mla_cuda.latent_cache_append(c_kv, k_rope, cache, torch.tensor([3, 64], device=DEV), validate=False)
    flat = cache.view(-1, 40)
    assert torch.equal(flat[3, :32], c_kv[0])
    assert torch.isnan(flat[torch.arange(64, device=DEV) != 3]).all()

    q_latent, q_rope, cache, table, lens = _decode_inputs()
    want = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125)
    bad_table = table.clone()
    bad_table[1, 0] = 2**30
    got = mla_cuda.attention(q_latent, q_rope, cache, bad_table, lens, 0.125, validate=False)
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert torch.isnan(got[1]).all()


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("decode_kernel", ["auto", "fma", "mma_wc4_wt2_kq16_kn16", "wgmma_g1"])
def test_validate_false_bad_block_is_nan_through_the_split_merge(decode_kernel, num_splits):
    """An out-of-range block id poisons its sequence's whole result (output
    and log-sum-exp), also when only one split of it saw the NaN rows and
    the combine kernel merges it with clean ones."""
    q_latent, q_rope, cache, table, lens = _decode_inputs()
    bad_table = table.clone()
    bad_table[2, 5] = 2**30  # one block in the middle of the 260-token sequence
    with decode_kernel_named(decode_kernel):
        want = mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125, num_splits=num_splits)
        got, lse = mla_cuda.attention(q_latent, q_rope, cache, bad_table, lens, 0.125, validate=False,
                                      num_splits=num_splits, return_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(got[:2], want[:2]) and torch.isfinite(lse[:2]).all()
    assert torch.isnan(got[2]).all() and torch.isnan(lse[2]).all()


def assert_wrote_slots(cache, ref, slots, dtype):
    """The rows of the slots given match the reference; every other row of
    the NaN-filled cache is still NaN."""
    D = cache.shape[-1]
    written = slots[slots >= 0]
    flat, flat_ref = cache.view(-1, D), ref.view(-1, D)
    assert rel_err(flat[written], flat_ref[written]) <= TOL[dtype]
    others = torch.ones(flat.shape[0], dtype=torch.bool, device=DEV)
    others[written] = False
    assert torch.isnan(flat[others]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,R,n_kv,r", [(1, 96, 3, 4), (1000, 2048, 32, 8), (77, 40, 1, 1), (300, 512, 1, 32), (5, 37, 2, 3)])
def test_append_gpu(dtype, T, R, n_kv, r):
    block_size = 16
    num_blocks = T // block_size + 4
    D = R + n_kv * 2 * r
    cache = torch.full((num_blocks, block_size, D), float("nan"), device=DEV).to(dtype)
    c_kv = torch.randn(T, R, device=DEV).to(dtype)
    k_rope = torch.randn(T, n_kv, 2 * r, device=DEV).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:T]
    if T > 2:
        slots[1] = -1
    freq_idx, inv_freq = make_rope_tables(n_kv, r, 4 * r + 2, DEV)
    pos = torch.randint(0, 30000, (T,), device=DEV)
    for fused in (False, True):
        rope = dict(positions=pos, rope_freq_idx=freq_idx, inv_freq=inv_freq) if fused else {}
        ref = append_ref(cache, c_kv, k_rope, slots, **rope)
        out = cache.clone()
        mla_cuda.latent_cache_append(c_kv, k_rope, out, slots, **rope)
        assert_wrote_slots(out, ref, slots, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [0, 1, 8])
def test_append_gpu_from_strided_views(dtype, pad):
    """c_kv and k_rope as views of wider token rows (a fused projection's
    output): 16-byte aligned token strides take the vectorized rows kernel,
    pad 1 the scalar one; both write exactly the rows of the slots given."""
    T, R, n_kv, r, block_size = 300, 96, 3, 4, 16
    D = R + n_kv * 2 * r
    wide = torch.randn(T, D + pad, device=DEV).to(dtype)
    c_kv, k_rope = wide[:, :R], wide[:, R:D].unflatten(1, (n_kv, 2 * r))
    cache = torch.full((T // block_size + 4, block_size, D), float("nan"), device=DEV).to(dtype)
    slots = torch.randperm(cache.shape[0] * block_size, device=DEV)[:T]
    slots[7] = -1
    freq_idx, inv_freq = make_rope_tables(n_kv, r, 64, DEV)
    pos = torch.randint(0, 32768, (T,), device=DEV)
    ref = append_ref(cache, c_kv, k_rope, slots, pos, freq_idx, inv_freq)
    mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots, pos, freq_idx, inv_freq)
    assert_wrote_slots(cache, ref, slots, dtype)


def test_append_gpu_bad_slot_leaves_cache():
    cache = torch.randn(4, 16, 40, device=DEV)
    before = cache.clone()
    with pytest.raises(ValueError, match="out of range"):
        mla_cuda.latent_cache_append(torch.randn(2, 32, device=DEV), torch.randn(2, 2, 4, device=DEV), cache,
                                     torch.tensor([3, 64], device=DEV))
    assert torch.equal(cache, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_h,n_kv,r,d_h", [(1, 9, 3, 4, 64), (4099, 32, 32, 8, 128), (333, 128, 1, 32, 64), (17, 6, 2, 1, 16)])
def test_rope_gpu(dtype, T, n_h, n_kv, r, d_h):
    q = torch.randn(T, n_h, 2 * r, device=DEV).to(dtype)
    k = torch.randn(T, n_kv, 2 * r, device=DEV).to(dtype)
    pos = torch.randint(0, 32768, (T,), device=DEV)
    freq_idx, inv_freq = make_rope_tables(n_kv, r, d_h, DEV)
    q_out, k_out = mla_cuda.partial_rope(q, k, pos, freq_idx, inv_freq)
    assert rel_err(q_out, rope_ref(q, pos, freq_idx, inv_freq, n_h // n_kv)) <= TOL[dtype]
    assert rel_err(k_out, rope_ref(k, pos, freq_idx, inv_freq, 1)) <= TOL[dtype]
    # backward = inverse rotation, checked against autograd of the reference
    qg = q.detach().float().clone().requires_grad_()
    kg = k.detach().float().clone().requires_grad_()
    qo, ko = mla_cuda.partial_rope(qg, kg, pos, freq_idx, inv_freq)
    w1, w2 = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * w1).sum() + (ko * w2).sum()).backward()
    qd = q.detach().double().requires_grad_()
    (rope_ref(qd, pos, freq_idx, inv_freq, n_h // n_kv) * w1.double()).sum().backward()
    assert rel_err(qg.grad, qd.grad) <= TOL[torch.float32] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [0, 1, 16])
def test_rope_gpu_inplace_on_strided_views(dtype, pad):
    """q and k as views of wider rows (a fused projection's layout): 16-byte
    aligned rows (pad 0, 16) take the vectorized kernel, pad 1 the scalar
    one; both turn only the view and leave the rest of each row as it was."""
    T, n_h, n_kv, r = 300, 9, 3, 4
    wide_q = torch.randn(T, n_h, 2 * r + pad, device=DEV).to(dtype)
    wide_k = torch.randn(T, n_kv, 2 * r + pad, device=DEV).to(dtype)
    q, k = wide_q[..., :2 * r], wide_k[..., :2 * r]
    want_q, want_k = q.clone(), k.clone()
    pos = torch.randint(0, 32768, (T,), device=DEV)
    freq_idx, inv_freq = make_rope_tables(n_kv, r, 64, DEV)
    before_q, before_k = wide_q.clone(), wide_k.clone()
    mla_cuda.partial_rope_(q, k, pos, freq_idx, inv_freq)
    assert rel_err(q, rope_ref(want_q, pos, freq_idx, inv_freq, n_h // n_kv)) <= TOL[dtype]
    assert rel_err(k, rope_ref(want_k, pos, freq_idx, inv_freq, 1)) <= TOL[dtype]
    assert torch.equal(wide_q[..., 2 * r:], before_q[..., 2 * r:])
    assert torch.equal(wide_k[..., 2 * r:], before_k[..., 2 * r:])


def test_cuda_graph_capture_and_replay():
    seq_lens = [100, 2000, 7]
    cache, table = make_paged_cache(seq_lens, 96, 3, 4, 16, torch.bfloat16, DEV, spare_blocks=8)
    q_latent, q_rope = make_queries(3, 1, 9, 96, 4, torch.bfloat16, DEV)
    q_latent, q_rope = q_latent[:, 0].contiguous(), q_rope[:, 0].contiguous()
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    c_new = torch.randn(3, 96, device=DEV).bfloat16()
    k_new = torch.randn(3, 3, 8, device=DEV).bfloat16()
    free_blocks = [int(b) for b in range(cache.shape[0]) if b not in set(table[table < 2**30].tolist())][:3]
    slots = torch.tensor([b * 16 for b in free_blocks], device=DEV)
    pos = torch.tensor(seq_lens, device=DEV)
    freq_idx, inv_freq = make_rope_tables(3, 4, 64, DEV)

    def step():
        mla_cuda.latent_cache_append(c_new, k_new, cache, slots, pos, freq_idx, inv_freq)
        return mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125)

    assert_graph_replays_step(step, q_latent)


def test_torch_compile_fullgraph_matches_eager():
    seq_lens = [50, 300]
    cache, table = make_paged_cache(seq_lens, 48, 3, 4, 16, torch.bfloat16, DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    q_nope = torch.randn(2, 9, 48, device=DEV).bfloat16()
    q_rope = torch.randn(2, 9, 8, device=DEV).bfloat16()
    k_dummy = torch.randn(2, 3, 8, device=DEV).bfloat16()
    pos = lens.long() - 1
    freq_idx, inv_freq = make_rope_tables(3, 4, 64, DEV)

    def fn(q_nope, q_rope):
        qr, _ = mla_cuda.partial_rope(q_rope, k_dummy, pos, freq_idx, inv_freq)
        return mla_cuda.attention(q_nope * 2, qr, cache, table, lens, 0.125) + 1

    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(q_nope, q_rope), fn(q_nope, q_rope))
