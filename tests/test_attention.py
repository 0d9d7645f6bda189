import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES
from op_inputs import make_paged_cache, make_queries
from reference import TOL, attention_ref, check_attention, rel_err

import mla_cuda


def run_case(seq_lens, Q, H, R, n_kv, r, block_size, dtype, device="cpu", num_splits=0):
    cache, table = make_paged_cache(seq_lens, R, n_kv, r, block_size, dtype, device)
    q_latent, q_rope = make_queries(len(seq_lens), Q, H, R, r, dtype, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = 1 / math.sqrt(2 * R / max(H, 1) + 1)
    ref_out, ref_lse = attention_ref(q_latent.cpu(), q_rope.cpu(), cache.cpu(), table.cpu(), lens.cpu(), scale)
    q_in, r_in = (q_latent[:, 0], q_rope[:, 0]) if Q == 1 else (q_latent, q_rope)
    out, lse = mla_cuda.attention(q_in, r_in, cache, table, lens, scale, return_lse=True, num_splits=num_splits)
    if Q == 1:
        out, lse = out.unsqueeze(1), lse.unsqueeze(1)
    assert out.dtype == dtype and lse.dtype == torch.float32
    return out.cpu(), lse.cpu(), ref_out, ref_lse


# SmolLM2-135M (9 heads, 3 KV heads, d_h 64, r=4, d_kv 32 -> R = 96), an odd
# shape (R=40, r=1, one KV head), MHA with several KV heads, block sizes 1/16/64.
CASES = [
    dict(seq_lens=[1, 17, 300], H=9, R=96, n_kv=3, r=4, block_size=16),
    dict(seq_lens=[5, 1], H=4, R=40, n_kv=1, r=1, block_size=1),
    dict(seq_lens=[64, 3, 129], H=8, R=52, n_kv=4, r=2, block_size=64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(dtype, case):
    check_attention(*run_case(Q=1, dtype=dtype, **case), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_token_causal(dtype):
    check_attention(*run_case([7, 40, 4], Q=4, H=6, R=24, n_kv=2, r=2, block_size=16, dtype=dtype), dtype)


def test_long_sequence_and_empty():
    check_attention(*run_case([2500, 0, 1], Q=1, H=3, R=16, n_kv=1, r=2, block_size=16, dtype=torch.float32),
                    torch.float32)


def test_empty_batch():
    cache = torch.randn(2, 4, 12)
    out = mla_cuda.attention(
        torch.randn(0, 2, 8), torch.randn(0, 2, 4), cache, torch.zeros(0, 1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32), 0.5,
    )
    assert out.shape == (0, 2, 8)


def test_nan_in_unused_slots_does_not_leak():
    """The NaN filling of unused slots is what makes a wrong read show."""
    out, lse, _, _ = run_case([3, 20], Q=1, H=2, R=8, n_kv=1, r=1, block_size=16, dtype=torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_reference_sees_a_wrong_cache():
    """A test that cannot fail is a defect: corrupt one used row and the
    comparison must fail."""
    seq_lens = [10]
    cache, table = make_paged_cache(seq_lens, 16, 1, 2, 4, torch.float32)
    q_latent, q_rope = make_queries(1, 1, 2, 16, 2, torch.float32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref, _ = attention_ref(q_latent, q_rope, cache, table, lens, 0.3)
    cache[table[0, 1], 2, :16] += 5.0
    out = mla_cuda.attention(q_latent[:, 0], q_rope[:, 0], cache, table, lens, 0.3)
    assert rel_err(out.unsqueeze(1), ref) > TOL[torch.float32]


def test_attention_opcheck():
    cache, table = make_paged_cache([5, 9], 12, 2, 2, 4, torch.float32)
    q_latent, q_rope = make_queries(2, 2, 4, 12, 2, torch.float32)
    args = (q_latent, q_rope, cache, table, torch.tensor([5, 9], dtype=torch.int32), 0.25, 0)
    torch.library.opcheck(torch.ops.mla_cuda.mla_attention, args)


def _good_args():
    cache, table = make_paged_cache([5, 9], 12, 2, 2, 4, torch.float32)
    return dict(
        q_latent=torch.randn(2, 4, 12), q_rope=torch.randn(2, 4, 4), latent_cache=cache,
        block_table=table, seq_lens=torch.tensor([5, 9], dtype=torch.int32), scale=0.3,
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(seq_lens=torch.tensor([5, 400], dtype=torch.int32)), "capacity"),
        (dict(block_table=torch.full((2, 4), 99, dtype=torch.int32)), "outside"),
        (dict(q_latent=torch.randn(2, 4, 12).half()), "dtype"),
        (dict(q_latent=torch.randn(2, 3, 12), q_rope=torch.randn(2, 3, 4)), "multiple"),
        (dict(q_rope=torch.randn(2, 4, 3)), "even"),
        (dict(q_latent=torch.randn(2, 4, 11)), "do not split"),
        (dict(seq_lens=torch.tensor([5.0, 9.0])), "integers"),
        (dict(q_latent=torch.randn(2, 12, 4).transpose(1, 2)), "contiguous"),
        (dict(block_table=torch.zeros(3, 4, dtype=torch.int32)), "B=2"),
    ],
)
def test_attention_bad_input(kw, match):
    args = _good_args()
    args.update(kw)
    with pytest.raises((RuntimeError, ValueError), match=match):
        mla_cuda.attention(**args)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(seq_lens=torch.tensor([5, 400], dtype=torch.int32)), "capacity"),
        (dict(block_table=torch.full((2, 4), 99, dtype=torch.int32)), "outside"),
    ],
)
def test_attention_validate_false_still_checks_indices_on_cpu(kw, match):
    """validate=False skips only the host-side checks of CUDA calls: the CPU
    kernel reads the indices anyway and refuses bad ones itself."""
    args = _good_args()
    args.update(kw)
    with pytest.raises(RuntimeError, match=match):
        mla_cuda.attention(**args, validate=False)


def test_attention_validate_false_same_result_on_cpu():
    args = _good_args()
    assert torch.equal(mla_cuda.attention(**args, validate=False), mla_cuda.attention(**args))


# ---- the CUDA decode kernel, chosen by name (a CUDA build; no GPU needed) ----
cuda_build = pytest.mark.skipif(not mla_cuda.build_info()["with_cuda"], reason="needs a CUDA build of mla_cuda")


@cuda_build
def test_decode_kernel_by_name_and_back():
    from mla_cuda import _C
    from mla_cuda._ops import decode_kernel, decode_kernel_names

    names = decode_kernel_names()
    assert names[:2] == ["auto", "fma"] and len(set(names)) == len(names) > 2
    before = _C.decode_kernel()
    for name in names:
        with decode_kernel(name):
            assert _C.decode_kernel() == name
        assert _C.decode_kernel() == before
    with pytest.raises(RuntimeError, match="'mma:2' names no decode kernel; use one of: auto, fma, warp_"):
        with decode_kernel("mma:2"):
            pass
    assert _C.decode_kernel() == before


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


@cuda_build
def test_decode_kernel_environment_is_read_once_and_checked():
    read_twice = "import os; from mla_cuda import _C; print(_C.decode_kernel()); " \
        "os.environ['MLA_DECODE_KERNEL'] = 'auto'; print(_C.decode_kernel())"
    run = _python(read_twice, MLA_DECODE_KERNEL="fma")
    assert run.stdout.split() == ["fma", "fma"], run.stderr
    run = _python("from mla_cuda import _C; _C.decode_kernel()", MLA_DECODE_KERNEL="mma:2")
    assert run.returncode != 0
    assert "MLA_DECODE_KERNEL=mma:2 names no decode kernel; use one of: auto, fma, warp_" in run.stderr
