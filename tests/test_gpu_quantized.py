"""GPU suite of the quantized latent cache: the CUDA append writes the same
bytes as the CPU reference kernel and the independent reference, CUDA
attention over fp8 / int4 rows equals a float64 reference that dequantizes
the same rows (outputs NaN-poisoned first), and both ops capture into a CUDA
graph and trace with torch.compile. Skipped without a GPU."""
import os

import pytest
import torch
from cuda_graph import assert_graph_replays_step
from op_inputs import make_rope_tables
from reference import (LONG_FLOAT32_TOL, TOL, check_attention, dequantize_rows_ref, quant_layout_ref, quantize_rows_ref, rel_err,
                       rope_ref)
from test_quantized_cache import _name, _quantized_paged_cache, run_quantized_case

import mla_cuda
from mla_cuda._ops import decode_kernel

pytestmark = pytest.mark.gpu
QUICK = os.environ.get("MLA_GPU_QUICK") == "1"
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [("fp8", None), ("int4", None), ("int4", 32), ("int4", 24), ("fp8", 16)]


def poison_allocator(nbytes):
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device=DEV)
    del junk


# (name, H, n_kv of the rope keys, R, r): converted models cache one rope key
SHAPES = [
    ("smollm-dkv16", 9, 1, 48, 4),
    ("smollm-dkv32", 9, 1, 96, 4),
    ("llama7b-dkv16", 32, 1, 512, 8),
    ("llama7b-dkv64", 32, 1, 2048, 8),
    ("gqa-R64", 8, 4, 64, 2),
    ("odd-R40-r1", 5, 1, 40, 1),
]
BATCHES = [(1, 5000), (7, 700), (64, 130)] if not QUICK else [(3, 300)]


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,R,n_kv,r", [(1, 96, 1, 4), (333, 2048, 1, 8), (70, 40, 3, 1), (17, 64, 1, 2)])
def test_append_gpu_writes_reference_bytes(kind, group, dtype, T, R, n_kv, r):
    if group is not None and R % group:
        pytest.skip("group does not divide R")
    fmt = _name(kind, group)
    row = quant_layout_ref(kind, R, group or R, n_kv * 2 * r * torch.empty((), dtype=dtype).element_size())[3]
    num_blocks, bs = T // 16 + 3, 16
    cache = torch.randint(0, 256, (num_blocks, bs, row), dtype=torch.uint8)
    c_kv = (torch.randn(T, R) * torch.logspace(0, -2, R)).to(dtype)
    k_rope = torch.randn(T, n_kv, 2 * r).to(dtype)
    slots = torch.randperm(num_blocks * bs)[:T]
    if T > 2:
        slots[1] = -1
    cpu = cache.clone()
    mla_cuda.latent_cache_append(c_kv, k_rope, cpu, slots, cache_format=fmt)
    gpu = cache.to(DEV)
    mla_cuda.latent_cache_append(c_kv.to(DEV), k_rope.to(DEV), gpu, slots.to(DEV), cache_format=fmt)
    assert torch.equal(gpu.cpu(), cpu)
    rows = quantize_rows_ref(kind, group or R, c_kv, k_rope)
    keep = slots >= 0
    assert torch.equal(cpu.view(-1, row)[slots[keep]], rows[keep])
    # fused RoPE: codes and scales exact, rope keys within rounding of float64
    freq_idx, inv_freq = make_rope_tables(n_kv, r, 4 * r + 2)
    pos = torch.randint(0, 5000, (T,))
    mla_cuda.latent_cache_append(c_kv.to(DEV), k_rope.to(DEV), gpu, slots.to(DEV), pos.to(DEV), freq_idx.to(DEV),
                                 inv_freq.to(DEV), cache_format=fmt)
    got = gpu.cpu().view(-1, row)[slots[keep]]
    rope_off = quant_layout_ref(kind, R, group or R, 0)[2]
    assert torch.equal(got[:, :rope_off], rows[keep][:, :rope_off])
    want = rope_ref(k_rope, pos, freq_idx, inv_freq, 1)[keep].flatten(1)
    back = dequantize_rows_ref(kind, group or R, R, got, dtype, n_kv * 2 * r)[:, R:]
    assert rel_err(back, want) <= TOL[dtype]


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("batch,max_len", BATCHES)
def test_attention_gpu_matches_dequantizing_reference(kind, group, dtype, shape, batch, max_len):
    _, H, n_kv, R, r = shape
    if group is not None and R % group:
        pytest.skip("group does not divide R")
    g = torch.Generator().manual_seed(batch + max_len)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    poison_allocator(batch * H * R * 4)
    check_attention(*run_quantized_case(lens.tolist(), Q=1, H=H, R=R, n_kv=n_kv, r=r, block_size=16,
                                        kind=kind, group=group, dtype=dtype, device=DEV), dtype,
                    tol=LONG_FLOAT32_TOL if dtype == torch.float32 else None)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_attention_gpu_multi_token_empty_and_block_size_one(kind):
    check_attention(*run_quantized_case([7, 40, 4], Q=4, H=6, R=24, n_kv=2, r=2, block_size=16,
                                        kind=kind, group=None, dtype=torch.bfloat16, device=DEV), torch.bfloat16)
    check_attention(*run_quantized_case([0, 33, 1], Q=1, H=9, R=96, n_kv=1, r=4, block_size=1,
                                        kind=kind, group=None, dtype=torch.float16, device=DEV), torch.float16)
    row = mla_cuda.cache_format.row_bytes(kind, 16, 4, torch.float32)  # the empty batch's float32 rope keys
    out = mla_cuda.attention(torch.randn(0, 4, 16, device=DEV), torch.randn(0, 4, 4, device=DEV),
                             torch.zeros(2, 4, row, dtype=torch.uint8, device=DEV),
                             torch.zeros(0, 1, dtype=torch.int32, device=DEV),
                             torch.zeros(0, dtype=torch.int32, device=DEV), 0.5, cache_format=kind)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_attention_gpu_more_rows_than_one_grid_holds(kind):
    # 1,100 sequences x 64 query tokens is past the 65,535 rows of one
    # launch's grid (a chunked prefill of a large batch): the op runs the call
    # in slices of whole sequences, and every slice must match the reference
    g = torch.Generator().manual_seed(11)
    lens = torch.randint(64, 100, (1100,), generator=g)
    check_attention(*run_quantized_case(lens.tolist(), Q=64, H=2, R=16, n_kv=1, r=1, block_size=16,
                                        kind=kind, group=None, dtype=torch.bfloat16, device=DEV), torch.bfloat16)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_gpu_tensor_core_path_multi_token_gqa_and_block_sizes(kind, dtype):
    """Shapes the tensor-core path takes (one scale per token, R a multiple
    of 16 up to 96, rope parts up to 32 values, block sizes that are
    multiples of 16): several query tokens a sequence, GQA rope keys, a
    last channel group of 16 (R = 48), sequences shorter than a tile."""
    poison_allocator(1 << 20)
    check_attention(*run_quantized_case([4, 5, 17, 300], Q=4, H=9, R=96, n_kv=1, r=4, block_size=16,
                                        kind=kind, group=None, dtype=dtype, device=DEV), dtype)
    check_attention(*run_quantized_case([33, 1, 700, 16], Q=1, H=8, R=48, n_kv=4, r=2, block_size=32,
                                        kind=kind, group=None, dtype=dtype, device=DEV), dtype)
    check_attention(*run_quantized_case([2000], Q=2, H=6, R=32, n_kv=2, r=4, block_size=64,
                                        kind=kind, group=None, dtype=dtype, device=DEV), dtype)


# Shapes the Hopper kernel takes over quantized rows on sm_90 (more than 16
# query rows a sequence, one scale per token, the latent whole 64-column
# blocks a block): one warpgroup (Llama-3-8B-like, GQA rope keys), two (64
# rows: DeepSeek-like; 40 rows of an odd rope width, whose last chunk
# crosses the rope part's end), a cluster of 2 (Llama-2-7B d_kv=16 rows; a
# rope slice of 6 values, no whole chunk) and of 4 (d_kv=64 rows).
HOPPER_QCASES = {
    "one-block-gqa-rope": dict(seq_lens=[300, 1, 64, 2000], Q=1, H=32, R=512, n_kv=8, r=8, block_size=64),
    "g2-64rows": dict(seq_lens=[129, 700], Q=1, H=64, R=512, n_kv=1, r=32, block_size=16),
    "g2-odd-rope": dict(seq_lens=[5, 190, 1000], Q=2, H=20, R=64, n_kv=5, r=3, block_size=16),
    "c2-wide-rope": dict(seq_lens=[77, 1500], Q=1, H=32, R=512, n_kv=32, r=8, block_size=16),
    "c2-rope-slice-6": dict(seq_lens=[333, 1], Q=1, H=32, R=1024, n_kv=2, r=3, block_size=32),
    "c4-llama2-dkv64": dict(seq_lens=[3000, 65], Q=1, H=32, R=2048, n_kv=32, r=8, block_size=64),
}


@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(HOPPER_QCASES))
def test_attention_gpu_hopper_shapes(kind, dtype, case):
    poison_allocator(1 << 24)
    check_attention(*run_quantized_case(kind=kind, group=None, dtype=dtype, device=DEV, **HOPPER_QCASES[case]), dtype)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("config", ["wgmma_g1", "wgmma_g2", "wgmma_g1_c2", "wgmma_g1_c4"])
def test_attention_gpu_hopper_forced_configurations(kind, config):
    """Each Hopper configuration forced on rows one block holds: one
    warpgroup over 32 rows (the automatic choice takes two there), two
    (one without rows), clusters that split a 512-wide latent in two and
    in four."""
    with decode_kernel(config):
        check_attention(*run_quantized_case([1000, 7, 64], Q=1, H=32, R=512, n_kv=8, r=8, block_size=16,
                                            kind=kind, group=None, dtype=torch.bfloat16, device=DEV), torch.bfloat16)


def kernels_launched(fn) -> list:
    """The names of the CUDA kernels fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    if not any("mla_cuda" in n for n in names):
        pytest.skip("torch.profiler records no CUDA kernels on this machine")
    return names


def hopper_kernel_built() -> bool:
    """An sm_90 GPU and a build with the wgmma kernel (sm_90a)."""
    return torch.cuda.get_device_capability() == (9, 0) and "9.0a" in (mla_cuda.build_info()["cuda_archs"] or "")


@pytest.mark.parametrize("kind,group", [("int4", 24), ("int4", 32), ("int4", 12), ("fp8", 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_gpu_group_scales_take_the_tensor_core_kernel(kind, group, dtype):
    """Rows with a scale per group of channels (whole runs of 4) on the
    tensor-core kernel of SmolLM2-size rows, with the grouped flag set:
    several query tokens and GQA rope keys, a last channel group of 16
    (R = 48), sequences shorter than a tile; never the scalar kernel."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the tensor-core kernel runs on sm_80+")
    poison_allocator(1 << 20)

    def run():
        check_attention(*run_quantized_case([4, 5, 17, 300], Q=4, H=9, R=96, n_kv=1, r=4, block_size=16,
                                            kind=kind, group=group, dtype=dtype, device=DEV), dtype)
        if 48 % group == 0:
            check_attention(*run_quantized_case([33, 1, 700, 16], Q=1, H=8, R=48, n_kv=4, r=2, block_size=32,
                                                kind=kind, group=group, dtype=dtype, device=DEV), dtype)

    names = kernels_launched(run)
    quant = [n for n in names if "mla_decode_quant_kernel" in n]
    assert quant and all(", true," in n for n in quant)  # the kGrouped instantiation
    assert not any("attention_quantized_kernel" in n for n in names)


# Group scales on the Hopper kernel (groups of whole 8-channel chunks): one
# block a row (R = 192, groups of 24 and 64), and clusters whose blocks each
# copy the scales of the groups their slice touches (R = 768: a cluster of
# 2 cuts a group of 256 in two, a cluster of 4 one of 128).
HOPPER_GROUPED = [("int4", 24, 192, "auto"), ("fp8", 64, 192, "auto"), ("int4", 256, 768, "wgmma_g1_c2"),
                  ("int4", 128, 768, "wgmma_g1_c4"), ("fp8", 128, 768, "wgmma_g1_c4")]


@pytest.mark.parametrize("kind,group,R,config", HOPPER_GROUPED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_gpu_hopper_group_scales(kind, group, R, config, dtype):
    if not hopper_kernel_built():
        pytest.skip("the Hopper kernel runs on sm_90 with an sm_90a build")
    poison_allocator(1 << 24)

    def run():
        with decode_kernel(config):
            check_attention(*run_quantized_case([300, 1, 64, 2000], Q=1, H=32, R=R, n_kv=4, r=4, block_size=64,
                                                kind=kind, group=group, dtype=dtype, device=DEV), dtype)

    assert any("mla_decode_wgmma_kernel" in n for n in kernels_launched(run))


@pytest.mark.parametrize("kind,group", [("fp8", None), ("int4", None), ("int4", 64)])
def test_hopper_bad_block_gives_nan_for_its_sequence_only(kind, group):
    cache, table = _quantized_paged_cache([200, 150], 512, 8, 8, 16, kind, group, torch.bfloat16)
    cache, table = cache.to(DEV), table.to(DEV)
    table[0, 3] = 10**6
    q = torch.randn(2, 32, 512, device=DEV).bfloat16()
    q_rope = torch.randn(2, 32, 16, device=DEV).bfloat16()
    lens = torch.tensor([200, 150], dtype=torch.int32, device=DEV)
    out = mla_cuda.attention(q, q_rope, cache, table, lens, 0.05, validate=False, cache_format=_name(kind, group),
                             kv_heads=8)
    torch.cuda.synchronize()
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


# (dtype, block size, kind, group): float32 and block size 4 take the
# scalar kernel, bf16 and block size 16 the tensor-core one
@pytest.mark.parametrize("dtype,block_size,kind,group", [(torch.float32, 4, "int4", None),
                                                         (torch.bfloat16, 16, "int4", None),
                                                         (torch.bfloat16, 16, "fp8", None),
                                                         (torch.bfloat16, 16, "int4", 8)])
def test_validate_false_bad_block_stays_inside_and_gives_nan(dtype, block_size, kind, group):
    cache, table = _quantized_paged_cache([40], 16, 1, 2, block_size, kind, group, dtype)
    kind = _name(kind, group)
    cache, table = cache.to(DEV), table.to(DEV)
    table[0, 1] = 10**6
    q, q_rope = torch.randn(1, 2, 16, device=DEV).to(dtype), torch.randn(1, 2, 4, device=DEV).to(dtype)
    lens = torch.tensor([40], dtype=torch.int32, device=DEV)
    out = mla_cuda.attention(q, q_rope, cache, table, lens, 0.3, validate=False, cache_format=kind, kv_heads=1)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="outside"):
        mla_cuda.attention(q, q_rope, cache, table, lens, 0.3, cache_format=kind, kv_heads=1)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_cuda_graph_capture_and_replay(kind):
    seq_lens = [100, 2000, 7]
    cache, table = _quantized_paged_cache(seq_lens, 96, 1, 4, 16, kind, None, torch.bfloat16)
    cache = torch.cat([cache, torch.zeros(3, *cache.shape[1:], dtype=torch.uint8)]).to(DEV)  # 3 free blocks
    table = table.to(DEV)
    free = cache.shape[0] - 3
    q_latent = torch.randn(3, 9, 96, device=DEV).bfloat16()
    q_rope = torch.randn(3, 9, 8, device=DEV).bfloat16()
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    c_new, k_new = torch.randn(3, 96, device=DEV).bfloat16(), torch.randn(3, 1, 8, device=DEV).bfloat16()
    slots = torch.tensor([(free + i) * 16 for i in range(3)], device=DEV)
    pos = torch.tensor(seq_lens, device=DEV)
    freq_idx, inv_freq = make_rope_tables(1, 4, 64, DEV)

    def step():
        mla_cuda.latent_cache_append(c_new, k_new, cache, slots, pos, freq_idx, inv_freq, cache_format=kind)
        return mla_cuda.attention(q_latent, q_rope, cache, table, lens, 0.125, cache_format=kind)

    assert_graph_replays_step(step, q_latent)


def test_torch_compile_fullgraph_matches_eager():
    cache, table = _quantized_paged_cache([50, 300], 48, 1, 4, 16, "int4", None, torch.bfloat16)
    cache, table = cache.to(DEV), table.to(DEV)
    lens = torch.tensor([50, 300], dtype=torch.int32, device=DEV)
    q_rope = torch.randn(2, 9, 8, device=DEV).bfloat16()

    def fn(q_nope):
        return mla_cuda.attention(q_nope * 2, q_rope, cache, table, lens, 0.125, cache_format="int4") + 1

    q = torch.randn(2, 9, 48, device=DEV).bfloat16()
    assert torch.equal(torch.compile(fn, fullgraph=True)(q), fn(q))


@pytest.mark.parametrize("cache_dtype", ["fp8", "int4"])
def test_generate_through_quantized_static_cache_compiled(cache_dtype):
    """generate() over StaticLatentCache with a quantized cache: the compiled,
    graph-captured decode gives the eager path's tokens."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from mha2mla import LatentKVCache, StaticLatentCache
    from test_generation import _converted, _padded_batch

    model = _converted("gqa", d_kv=8).to(DEV)  # float32: compiled and eager round alike
    ids, mask = (t.to(DEV) for t in _padded_batch())
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **LatentKVCache(model, cache_dtype=cache_dtype).as_kwargs(), **kw)
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=32, cache_dtype=cache_dtype)
    assert torch.equal(model.generate(ids, **cache.as_kwargs(), **kw), eager)
