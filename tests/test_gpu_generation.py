"""GPU: transformers generate() of a converted model through LatentKVCache
on the CUDA kernels. Skipped without a GPU."""
import pytest
import torch

pytest.importorskip("transformers")

from mha2mla.cache import LatentKVCache  # noqa: E402
from test_generation import _converted, _padded_batch, no_deprecation_warnings, teacher_forced_rel_errors  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_generate_float32_on_gpu_matches_full_forward(kind):
    """float32: token for token equal to generate without a cache (full
    forwards that rebuild K and V), left-padded batch, growing cache."""
    model = _converted(kind).cuda()
    ids, mask = _padded_batch()
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    with no_deprecation_warnings():
        got = model.generate(ids, attention_mask=mask, **LatentKVCache(model, initial_tokens=4).as_kwargs(), **kw)
    assert torch.equal(got, want)


def test_float32_decode_of_several_tokens_on_gpu_matches_full_forward():
    """float32 teacher-forced: the prefill and decode steps of one and of
    several tokens per sequence on the CUDA kernels equal the full forward's
    logits to rounding."""
    model = _converted("gqa", rope="pca").cuda()
    ids, _ = _padded_batch(2)
    errors = teacher_forced_rel_errors(model, ids.cuda(), chunks=(4, 1, 3, 1))
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_16bit_on_gpu_logits_close(dtype):
    """16-bit on the tensor-core decode kernel: teacher-forced logits through
    the latent cache within 1.5e-2 relative of the full forward's."""
    model = _converted().cuda().to(dtype)
    ids, _ = _padded_batch(2)
    assert max(teacher_forced_rel_errors(model, ids.cuda())) < 1.5e-2
