import pytest
import torch
from conftest import DTYPES
from op_inputs import make_rope_tables
from reference import TOL, append_ref, rel_err

import mla_cuda


def _inputs(T, R, n_kv, r, num_blocks, block_size, dtype):
    D = R + n_kv * 2 * r
    cache = torch.randn(num_blocks, block_size, D).to(dtype)
    c_kv = torch.randn(T, R).to(dtype)
    k_rope = torch.randn(T, n_kv, 2 * r).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:T]
    return cache, c_kv, k_rope, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T,R,n_kv,r,block_size",
    [(1, 96, 3, 4, 16), (37, 40, 1, 1, 1), (64, 100, 5, 3, 64), (0, 32, 2, 2, 16), (130, 2048, 32, 8, 16)],
)
@pytest.mark.parametrize("fused_rope", [False, True])
def test_append_matches_reference(dtype, T, R, n_kv, r, block_size, fused_rope):
    cache, c_kv, k_rope, slots = _inputs(T, R, n_kv, r, max(4, T // block_size + 3), block_size, dtype)
    if T > 2:
        slots[1] = -1  # padding: skipped
    rope = {}
    if fused_rope:
        freq_idx, inv_freq = make_rope_tables(n_kv, r, 4 * r + 2)
        rope = dict(positions=torch.randint(0, 5000, (T,)), rope_freq_idx=freq_idx, inv_freq=inv_freq)
    ref = append_ref(cache, c_kv, k_rope, slots, **rope)
    mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots, **rope)
    written = slots[slots >= 0]
    flat, flat_ref = cache.reshape(-1, cache.shape[-1]), ref.reshape(-1, ref.shape[-1])
    # untouched rows are bit-identical, written rows within the dtype's rounding
    mask = torch.ones(flat.shape[0], dtype=torch.bool)
    mask[written] = False
    assert torch.equal(flat[mask].double(), flat_ref[mask])
    if written.numel():
        assert rel_err(flat[written], flat_ref[written]) <= TOL[dtype]


def test_append_strided_c_kv():
    """c_kv may be a column slice of a wider projection output."""
    cache, _, k_rope, slots = _inputs(9, 24, 2, 2, 4, 8, torch.float32)
    wide = torch.randn(9, 40)
    c_kv = wide[:, 8:32]
    ref = append_ref(cache, c_kv, k_rope, slots)
    mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots)
    assert torch.equal(cache.double(), ref)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(slot_mapping=torch.tensor([0, 10**6, 2])), "out of range"),
        (lambda a: a.update(c_kv=a["c_kv"].half()), "dtype"),
        (lambda a: a.update(c_kv=a["c_kv"][:, :-1]), "R \\+ n_kv\\*2r"),
        (lambda a: a.update(k_rope=a["k_rope"][:2]), "number of tokens"),
        (lambda a: a.update(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), "integers"),
        (lambda a: a.update(positions=torch.arange(3)), "all of positions"),
        (lambda a: a.update(latent_cache=a["latent_cache"].transpose(0, 1)), "contiguous"),
    ],
)
def test_append_bad_input_raises_and_leaves_cache(mutate, match):
    cache, c_kv, k_rope, _ = _inputs(3, 16, 2, 2, 4, 4, torch.float32)
    args = dict(c_kv=c_kv, k_rope=k_rope, latent_cache=cache, slot_mapping=torch.tensor([0, 5, 2]))
    before = cache.clone()
    mutate(args)
    with pytest.raises((RuntimeError, ValueError), match=match):
        mla_cuda.latent_cache_append(**args)
    assert torch.equal(cache, before)


def test_append_opcheck():
    cache, c_kv, k_rope, slots = _inputs(5, 24, 2, 2, 4, 4, torch.float32)
    freq_idx, inv_freq = make_rope_tables(2, 2, 16)
    torch.library.opcheck(torch.ops.mla_cuda.latent_cache_append, (c_kv, k_rope, cache, slots))
    torch.library.opcheck(
        torch.ops.mla_cuda.latent_cache_append,
        (c_kv, k_rope, cache, slots, torch.arange(5), freq_idx, inv_freq),
    )


def test_append_validate_false_still_checks_indices_on_cpu():
    """validate=False skips only the host-side checks of CUDA calls: the CPU
    kernel refuses a bad slot or frequency index itself, before any write."""
    cache, c_kv, k_rope, slots = _inputs(3, 16, 2, 2, 4, 4, torch.float32)
    freq_idx, inv_freq = make_rope_tables(2, 2, 16)
    before = cache.clone()
    with pytest.raises(RuntimeError, match="out of range"):
        mla_cuda.latent_cache_append(c_kv, k_rope, cache, torch.tensor([0, 10**6, 2]), validate=False)
    freq_idx[1, 1] = inv_freq.shape[0]
    with pytest.raises(RuntimeError, match="outside"):
        mla_cuda.latent_cache_append(c_kv, k_rope, cache, slots, torch.arange(3), freq_idx, inv_freq, validate=False)
    assert torch.equal(cache, before)
