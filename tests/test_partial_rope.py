import pytest
import torch
from conftest import DTYPES
from op_inputs import make_rope_tables
from reference import TOL, rel_err, rope_ref

import mla_cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_h,n_kv,r,head_dim", [(1, 9, 3, 4, 64), (33, 4, 1, 1, 16), (70, 32, 32, 8, 128), (0, 2, 2, 2, 8)])
def test_rope_matches_reference(dtype, T, n_h, n_kv, r, head_dim):
    q = torch.randn(T, n_h, 2 * r).to(dtype)
    k = torch.randn(T, n_kv, 2 * r).to(dtype)
    pos = torch.randint(0, 40000, (T,))
    freq_idx, inv_freq = make_rope_tables(n_kv, r, head_dim)
    q_ref = rope_ref(q, pos, freq_idx, inv_freq, n_h // n_kv)
    k_ref = rope_ref(k, pos, freq_idx, inv_freq, 1)
    q_out, k_out = mla_cuda.partial_rope(q, k, pos, freq_idx, inv_freq)
    if T:
        assert rel_err(q_out, q_ref) <= TOL[dtype] and rel_err(k_out, k_ref) <= TOL[dtype]
    # in place, on views inside wider buffers (strided token and head dims)
    qbuf = torch.randn(T, n_h, 2 * r + 6).to(dtype)
    kbuf = torch.randn(T, n_kv, 2 * r + 6).to(dtype)
    qv, kv = qbuf[..., 3 : 3 + 2 * r], kbuf[..., 3 : 3 + 2 * r]
    qv.copy_(q)
    kv.copy_(k)
    untouched = qbuf[..., :3].clone()
    mla_cuda.partial_rope_(qv, kv, pos, freq_idx, inv_freq)
    if T:
        assert rel_err(qv, q_ref) <= TOL[dtype] and rel_err(kv, k_ref) <= TOL[dtype]
    assert torch.equal(qbuf[..., :3], untouched)
    # and back again
    mla_cuda.partial_rope_(qv, kv, pos, freq_idx, inv_freq, inverse=True)
    if T:
        assert rel_err(qv, q) <= 4 * TOL[dtype]


def test_rope_leading_dims_and_frequency_choice_matter():
    q = torch.randn(2, 5, 6, 8)
    k = torch.randn(2, 5, 3, 8)
    pos = torch.arange(10).reshape(2, 5)
    freq_idx, inv_freq = make_rope_tables(3, 4, 32)
    q1, k1 = mla_cuda.partial_rope(q, k, pos, freq_idx, inv_freq)
    assert q1.shape == q.shape and k1.shape == k.shape
    ref = rope_ref(q.reshape(10, 6, 8), pos.reshape(10), freq_idx, inv_freq, 2)
    assert rel_err(q1.reshape(10, 6, 8), ref) <= TOL[torch.float32]
    q2, _ = mla_cuda.partial_rope(q, k, pos, (freq_idx + 1) % 16, inv_freq)
    assert not torch.allclose(q1, q2)


def test_rope_gradcheck():
    pos = torch.randint(0, 100, (4,))
    freq_idx, inv_freq = make_rope_tables(2, 3, 16)
    q = torch.randn(4, 4, 6, requires_grad=True)
    k = torch.randn(4, 2, 6, requires_grad=True)
    fn = lambda q, k: mla_cuda.partial_rope(q, k, pos, freq_idx, inv_freq)  # noqa: E731
    # The op is linear in q and k, so float32 finite differences are exact
    # up to rounding.
    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-2, atol=1e-3, rtol=1e-3)


def test_rope_opcheck():
    pos = torch.randint(0, 100, (5,))
    freq_idx, inv_freq = make_rope_tables(2, 2, 16)
    q, k = torch.randn(5, 4, 4), torch.randn(5, 2, 4)
    torch.library.opcheck(torch.ops.mla_cuda.partial_rope, (q, k, pos, freq_idx, inv_freq, False))
    torch.library.opcheck(torch.ops.mla_cuda.partial_rope_, (q.clone(), k.clone(), pos, freq_idx, inv_freq, False))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(q=torch.randn(3, 5, 4)), "multiple of"),
        (dict(rope_freq_idx=torch.tensor([[0, 9], [1, 2]])), "outside"),
        (dict(rope_freq_idx=torch.zeros(3, 2, dtype=torch.long)), "rope_freq_idx must be"),
        (dict(k=torch.randn(3, 2, 4).half()), "dtype"),
        (dict(q=torch.randn(3, 4, 3), k=torch.randn(3, 2, 3)), "even"),
        (dict(positions=torch.arange(4)), "positions"),
        (dict(inv_freq=torch.ones(4, dtype=torch.float64)), "float32"),
    ],
)
def test_rope_bad_input(kw, match):
    args = dict(
        q=torch.randn(3, 4, 4),
        k=torch.randn(3, 2, 4),
        positions=torch.arange(3),
        rope_freq_idx=torch.tensor([[0, 1], [1, 2]]),
        inv_freq=torch.ones(4),
    )
    args.update(kw)
    with pytest.raises((RuntimeError, ValueError), match=match):
        mla_cuda.partial_rope(**args)


def test_rope_validate_false_still_checks_frequencies_on_cpu():
    """validate=False skips only the host-side check of CUDA calls: the CPU
    kernel refuses an out-of-range frequency index itself."""
    q, k = torch.randn(3, 4, 4), torch.randn(3, 2, 4)
    bad = torch.tensor([[0, 9], [1, 2]])
    with pytest.raises(RuntimeError, match="outside"):
        mla_cuda.partial_rope(q, k, torch.arange(3), bad, torch.ones(4), validate=False)
    with pytest.raises(RuntimeError, match="outside"):
        mla_cuda.partial_rope_(q, k, torch.arange(3), bad, torch.ones(4), validate=False)
