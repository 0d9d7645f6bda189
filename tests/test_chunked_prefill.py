"""Chunked prefill (generate(..., prefill_chunk_size=N)) through both latent
caches: the prompt goes in forwards of at most N tokens, and generation gives
the same tokens as an unchunked prefill and as full forwards, left padding
and prompts of different lengths included."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import LatentKVCache, StaticLatentCache  # noqa: E402
from mha2mla.decode_projections import fuse_decode_weights  # noqa: E402
from test_generation import _converted, _padded_batch  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0)


def _cache(model, cache_kind):
    if cache_kind == "latent":
        return LatentKVCache(model, block_size=4, initial_tokens=2)
    return StaticLatentCache(model, max_batch_size=4, max_cache_len=32, block_size=4)


def _longest_forward(model):
    """A list that records the token count of every forward of layer 0."""
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs else args[0].shape[1]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("fusion", ["on", "off"])
@pytest.mark.parametrize("cache_kind", ["latent", "static"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 9])
def test_chunked_prefill_generates_the_unchunked_tokens(cache_kind, chunk, fusion):
    """Left-padded prompts of 9, 5 and 2 real tokens: with chunks of 3 or 4
    the shortest prompt's padding (7 tokens) runs past the first chunk, so
    later chunks mix sequences still in their padding with sequences
    decoding over the cache. Every forward holds at most `chunk` tokens,
    padding never reaches the cache, and the tokens equal the unchunked
    prefill's and full forwards'."""
    model = _converted("qwen2")
    fuse_decode_weights(model, fusion)
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, **GREEDY)
    want = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(model.generate(ids, **_cache(model, cache_kind).as_kwargs(), **kw), want)
    seen = _longest_forward(model)
    cache = _cache(model, cache_kind)
    got = model.generate(ids, prefill_chunk_size=chunk, **cache.as_kwargs(), **kw)
    assert torch.equal(got, want)
    assert max(seen) == chunk and len(seen) == -(-ids.shape[1] // chunk) + 10 - 1
    real = (mask.sum(1) + 10 - 1).tolist()  # the last generated token is never fed back
    lens = cache.paged.seq_lens([0, 1, 2]) if cache_kind == "latent" else cache.seq_lens[:3]
    assert lens.tolist() == real


@pytest.mark.parametrize("cache_kind", ["latent", "static"])
def test_chunked_prefill_of_equal_prompts_matches_full_forward_logits(cache_kind):
    """Unpadded prompts in chunks of 4 and a last one of 2: the logits of the
    last prompt token after the chunks equal the full forward's to float32
    rounding."""
    model = _converted("gqa", rope="pca")
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits[:, -1].double()
    out = model.generate(ids, prefill_chunk_size=4, max_new_tokens=1, output_logits=True, return_dict_in_generate=True,
                         **_cache(model, cache_kind).as_kwargs(), **GREEDY)
    got = out.logits[0].double()
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("cache_kind", ["latent", "static"])
def test_padding_inside_a_cached_sequence_is_refused(cache_kind):
    """Padding in a later forward is accepted only as the rest of a left
    padding: a sequence that has cached tokens cannot get padding again."""
    model = _converted()
    ids, mask = _padded_batch()
    cache = _cache(model, cache_kind)
    with torch.no_grad():
        model(input_ids=ids[:, :4], attention_mask=mask[:, :4], **cache.as_kwargs())
        later = mask[:, :6].clone()
        later[0, 5] = 0  # the first sequence has real tokens cached
        with pytest.raises(ValueError, match="padding is only supported in the prompt"):
            model(input_ids=ids[:, 4:6], attention_mask=later, **cache.as_kwargs())
