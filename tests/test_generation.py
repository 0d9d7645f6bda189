"""transformers generate() of a converted model through LatentKVCache equals
generation by full forwards, token for token in float32."""
import contextlib
import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model  # noqa: E402
from mha2mla.cache import LatentKVCache  # noqa: E402
from test_conversion import stats_for, tiny_model  # noqa: E402


def _padded_batch(seed=0):
    """ids, mask [3, 9]: prompts of 9, 5 and 2 real tokens, left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _converted(kind="gqa", d_kv=6, rope="2norm"):
    model = tiny_model(kind)
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy=rope, r=2, d_kv=d_kv), progress=False)
    return model.eval()


@contextlib.contextmanager
def no_deprecation_warnings():
    """Fails on a FutureWarning or DeprecationWarning, and on a deprecation
    that transformers only logs (warning_once: its memory of messages
    already shown is cleared first, so an earlier test cannot hide one)."""
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    root = logging.getLogger("transformers")
    transformers.utils.logging.warning_once.cache_clear()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    finally:
        root.removeHandler(handler)
    assert not [m for m in logged if "deprecat" in m.lower()], logged


@pytest.mark.parametrize("kind,rope,padded", [("gqa", "2norm", True), ("qwen2", "pca", True), ("mha", "high", True),
                                              ("gqa", "2norm", False)])
def test_generate_with_latent_cache_matches_full_forward(kind, rope, padded):
    """Greedy, left-padded batch, more new tokens than the prompt and than
    the cache first holds (it grows): token for token equal to generate
    without a cache (full forwards that rebuild K and V) and to generate
    with the model's default cache; no deprecation warning."""
    model = _converted(kind, rope=rope)
    ids, mask = _padded_batch()
    if not padded:
        ids, mask = ids[:1], mask[:1]
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    want = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(model.generate(ids, **kw), want)
    cache = LatentKVCache(model, block_size=4, initial_tokens=3)
    with no_deprecation_warnings():
        got = model.generate(ids, **cache.as_kwargs(), **kw)
    assert torch.equal(got, want)
    assert cache.paged.num_blocks > len(ids) * 3  # it grew
    # padding never reaches the cache: each sequence holds its real tokens only
    real = mask.sum(1) + 20 - 1  # the last generated token is never fed back
    assert cache.paged.seq_lens(list(range(len(ids)))).tolist() == real.tolist()


def test_sampling_is_reproducible_and_cache_holds_only_latents():
    model = _converted()
    ids, mask = _padded_batch(1)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        cache = LatentKVCache(model)
        outs.append(model.generate(ids, attention_mask=mask, **cache.as_kwargs(), do_sample=True, top_k=20,
                                   temperature=0.9, max_new_tokens=6, pad_token_id=0))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (3, 15)
    # no full-size K or V anywhere: the only tensors are the latent rows
    # [blocks, block_size, R + 2*n_pairs] of docs/method.md's cache formula,
    # (d_kv + 2r) * n_kv per layer: (6 + 4) * 2 = 20
    attn = model.model.layers[0].self_attn
    assert attn.latent_dim + 2 * attn.rope_pairs == 20
    assert all(t.shape[-1] == 20 for t in cache.paged.layers)
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)
    assert cache.bytes_per_token() == len(cache.paged.layers) * 20 * 4


def teacher_forced_rel_errors(model, ids, chunks=(5, 1, 1, 1, 1), cache=None):
    """Relative error of each forward's logits through a latent cache
    (LatentKVCache unless given: a prefill of chunks[0] tokens, then one
    decode step per further chunk, chunk tokens per sequence at once) against
    a full forward over the same tokens. ids [batch, >= sum(chunks)]."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.double()
        cache = LatentKVCache(model) if cache is None else cache
        errors, start = [], 0
        for n in chunks:
            got = model(input_ids=ids[:, start : start + n], **cache.as_kwargs()).logits.double()
            want = full[:, start : start + n]
            errors.append(float((got - want).norm() / want.norm()))
            start += n
    return errors


def test_teacher_forced_logits_match_full_forward():
    """float32: every logit of the prefill and of decode steps of one and of
    several tokens per sequence (causal among themselves) equals the full
    forward's to rounding."""
    model = _converted("gqa", rope="pca")
    ids, _ = _padded_batch(2)
    errors = teacher_forced_rel_errors(model, ids, chunks=(4, 1, 3, 1))
    assert max(errors) < 1e-5, errors


def test_bf16_latent_cache_logits_close_to_full_forward():
    """bf16: teacher-forced logits through the latent cache (prefill, then
    decode steps on the kernels) against a bf16 full forward; tolerance
    1.5e-2 relative (bf16 keeps 8 bits of mantissa, and the two paths sum in
    different orders)."""
    model = _converted().to(torch.bfloat16)
    ids, _ = _padded_batch(2)
    assert max(teacher_forced_rel_errors(model, ids)) < 1.5e-2


def test_latent_cache_bad_use_fails_clearly():
    with pytest.raises(TypeError, match="converted model"):
        LatentKVCache(tiny_model("gqa"))
    model = _converted()
    ids, mask = _padded_batch()
    with torch.no_grad():
        cache = LatentKVCache(model)
        model(input_ids=ids, attention_mask=mask, **cache.as_kwargs())
        with pytest.raises(ValueError, match="batch changed"):
            model(input_ids=ids[:2, :1], **cache.as_kwargs())
        cache = LatentKVCache(model)
        model(input_ids=ids[:1], **cache.as_kwargs())
        with pytest.raises(ValueError, match="padding is only supported in the prompt"):
            model(input_ids=ids[:1, :2], attention_mask=torch.tensor([[1] * 9 + [0, 1]]), **cache.as_kwargs())
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, num_beams=2, do_sample=False, **LatentKVCache(model).as_kwargs(), **kw)
    # transformers >= 5.2x refuses a cache that cannot be cropped itself, earlier ones reach LatentKVCache.crop
    with pytest.raises((NotImplementedError, ValueError), match="(?i)assisted"):
        model.generate(ids[:1], attention_mask=mask[:1], assistant_model=_converted(d_kv=4), do_sample=False,
                       max_new_tokens=6, pad_token_id=0, **LatentKVCache(model).as_kwargs())
