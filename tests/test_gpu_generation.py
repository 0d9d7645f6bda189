"""GPU: transformers generate() of a converted model through LatentKVCache
and through StaticLatentCache (eager, and compiled and graph-captured as
generate() does for a compileable cache) on the CUDA kernels. Skipped
without a GPU."""
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


def _static_generate(model, ids, mask, cache, compiled: bool, **kw):
    """generate() through the static cache; compiled: transformers' own
    choice for a compileable cache on a GPU (torch.compile of the decode
    forward, inductor, mode="reduce-overhead": CUDA graphs), else eager."""
    cache.reset()
    return model.generate(ids, attention_mask=mask, **cache.as_kwargs(), disable_compile=not compiled,
                          do_sample=False, pad_token_id=0, **kw)


def test_compiled_static_generate_on_gpu_matches_eager_float32():
    """float32: generate() compiled and graph-captured over StaticLatentCache
    equals the eager static path and full forwards token for token; the
    decode step is one graph (no graph break), captured (no CUDA-graph skip),
    and a second generate() call after reset() replays it without
    recompiling."""
    from torch._dynamo.utils import counters

    from mha2mla import StaticLatentCache

    model = _converted("gqa", rope="pca").cuda()
    ids, mask = _padded_batch()
    ids, mask = ids.cuda(), mask.cuda()
    want = model.generate(ids, attention_mask=mask, use_cache=False, max_new_tokens=24, do_sample=False,
                          pad_token_id=0)
    cache = StaticLatentCache(model, max_batch_size=4, max_cache_len=40)
    eager = _static_generate(model, ids, mask, cache, compiled=False, max_new_tokens=24)
    assert torch.equal(eager, want)
    torch._dynamo.reset()
    counters.clear()
    try:
        assert torch.equal(_static_generate(model, ids, mask, cache, compiled=True, max_new_tokens=24), eager)
        frames = counters["stats"]["unique_graphs"]
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["inductor"]["cudagraph_skips"] == 0
        assert torch.equal(_static_generate(model, ids, mask, cache, compiled=True, max_new_tokens=24), eager)
        assert counters["stats"]["unique_graphs"] == frames  # no recompilation
    finally:
        torch._dynamo.reset()


def test_compiled_static_generate_on_gpu_runs_in_bf16():
    """bf16: the compiled, graph-captured static path generates (finite
    logits at every step, the batch's shape) and its teacher-forced logits
    through the static cache are within the 16-bit tolerance."""
    from mha2mla import StaticLatentCache

    model = _converted().cuda().to(torch.bfloat16)
    ids, mask = _padded_batch()
    ids, mask = ids.cuda(), mask.cuda()
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=40)
    torch._dynamo.reset()
    try:
        out = _static_generate(model, ids, mask, cache, compiled=True, max_new_tokens=16,
                               return_dict_in_generate=True, output_logits=True)
    finally:
        torch._dynamo.reset()
    assert out.sequences.shape == (3, ids.shape[1] + 16)
    assert all(torch.isfinite(step).all() for step in out.logits)
    with torch.no_grad():
        full = model(input_ids=ids[:, :5], use_cache=False).logits.float()
        cache.reset()
        got = model(input_ids=ids[:, :4], **cache.as_kwargs()).logits.float()
        got = torch.cat([got, model(input_ids=ids[:, 4:5], **cache.as_kwargs()).logits.float()], dim=1)
    assert float((got - full).norm() / full.norm()) < 1.5e-2
