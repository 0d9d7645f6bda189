"""generate() of a converted model through LatentKVCache and
StaticLatentCache with fp8 and int4 latents (CPU): the caches hold uint8
rows of the format and count their bytes; teacher-forced logits stay close
to the 16-bit path, closer for fp8 than for int4; fp8 generation mostly
gives the 16-bit tokens."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import LatentKVCache, StaticLatentCache  # noqa: E402
from test_generation import _converted, _padded_batch, teacher_forced_rel_errors  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0)


def _model():
    return _converted("gqa", d_kv=8)  # R = 2 KV heads * 8 = 16, rope width 8, float32


def _caches(model, cache_dtype, batch=3):
    return [LatentKVCache(model, block_size=4, initial_tokens=3, cache_dtype=cache_dtype),
            StaticLatentCache(model, max_batch_size=batch, max_cache_len=64, cache_dtype=cache_dtype)]


@pytest.mark.parametrize("cache_dtype,row", [("fp8", 64), ("int4", 48), ("int4-g8", 48), ("auto", 96)])
def test_cache_rows_and_bytes_per_token(cache_dtype, row):
    """R=16 and a rope key of 8 float32 values (32 bytes): fp8 16 + 4 + 32
    -> 64 bytes, int4 8 + 4 + 32 -> 48, int4 with two scales 8 + 8 + 32 =
    48; unquantized 24 float32."""
    model = _model()
    layers = len(model.model.layers)
    for cache in _caches(model, cache_dtype):
        assert cache.bytes_per_token() == layers * row
    ids, mask = _padded_batch()
    cache = LatentKVCache(model, cache_dtype=cache_dtype)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache.as_kwargs())
    assert cache.paged.bytes_per_token == layers * row
    assert all(t.dtype == (torch.float32 if cache_dtype == "auto" else torch.uint8) for t in cache.paged.layers)


def test_teacher_forced_logits_close_to_16_bit_path():
    """Prefill, then decode steps of 1 and 3 tokens that read the quantized
    cache: relative logit error against the full forward, fp8 < int4 <
    bounds that a wrong dequantization (a lost scale, swapped nibbles)
    exceeds by far."""
    model = _model()
    ids, _ = _padded_batch(2)
    chunks = (2, 1, 3, 1, 1)
    worst = {}
    for cache_dtype in ["fp8", "int4"]:
        for cache in _caches(model, cache_dtype):
            errors = teacher_forced_rel_errors(model, ids, chunks=chunks, cache=cache)
            assert errors[0] < 1e-5  # the prefill attends over the unquantized prompt
            worst[cache_dtype] = max(worst.get(cache_dtype, 0.0), max(errors[1:]))
    assert worst["fp8"] < 0.05 and worst["int4"] < 0.3 and worst["fp8"] < worst["int4"], worst


@pytest.mark.parametrize("cache_dtype", ["fp8", "int4"])
def test_generate_through_both_quantized_caches(cache_dtype):
    """Greedy, left-padded batch: both caches give the same tokens (one
    kernel, one quantization), valid ids. fp8 mostly picks the 16-bit
    tokens: fed the 16-bit path's greedy output one token a step, its
    argmax is the 16-bit choice at >= 90% of the steps (free-running
    sequences of a tiny random model, whose logits are nearly flat, part
    ways at the first differing token, so they are compared only for
    validity)."""
    model = _model()
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=16, **GREEDY)
    want = model.generate(ids, **LatentKVCache(model).as_kwargs(), **kw)
    got = [model.generate(ids, **cache.as_kwargs(), **kw) for cache in _caches(model, cache_dtype)]
    assert torch.equal(got[0], got[1])
    new = got[0][:, ids.shape[1]:]
    assert new.shape == (3, 16) and int(new.min()) >= 0 and int(new.max()) < model.config.vocab_size
    if cache_dtype == "fp8":
        cache = LatentKVCache(model, cache_dtype="fp8")
        prompt = ids.shape[1]
        with torch.no_grad():
            model(input_ids=want[:, :prompt], attention_mask=mask, **cache.as_kwargs())
            full_mask = torch.cat([mask, torch.ones_like(want[:, prompt:])], 1)
            picks = [model(input_ids=want[:, i : i + 1], attention_mask=full_mask[:, : i + 1],
                           **cache.as_kwargs()).logits[:, -1].argmax(-1) for i in range(prompt, want.shape[1] - 1)]
        agree = float((torch.stack(picks, 1) == want[:, prompt + 1 :]).float().mean())
        assert agree >= 0.9, agree


def test_bad_cache_dtype_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="unknown cache format|unknown cache_dtype"):
        LatentKVCache(model, cache_dtype="nf4")
    with pytest.raises(ValueError, match="differs from the model dtype"):
        LatentKVCache(model, cache_dtype="bf16")
    with pytest.raises(ValueError, match="divide"):
        StaticLatentCache(model, 1, 8, cache_dtype="int4-g6")


def test_perplexity_through_the_cache():
    """Scored through LatentKVCache decode steps: the 16-bit (here float32)
    cache gives the full forward's perplexity; fp8 within 2%; int4 off by
    more than fp8 but finite."""
    from mha2mla.perplexity import perplexity, perplexity_through_cache

    model = _model()
    ids = torch.randint(0, 97, (200,))
    kw = dict(context=48, stride=24, progress=False, batch_size=4)
    full = perplexity(model, ids, **kw)["ppl"]
    got = {d: perplexity_through_cache(model, ids, cache_dtype=d, chunk=7, **kw) for d in ["auto", "fp8", "int4"]}
    assert abs(got["auto"]["ppl"] / full - 1) < 1e-4
    assert abs(got["fp8"]["ppl"] / full - 1) < 0.02
    assert abs(got["fp8"]["ppl"] / full - 1) < abs(got["int4"]["ppl"] / full - 1) < 1
    assert got["int4"]["bytes_per_token"] < got["fp8"]["bytes_per_token"] < got["auto"]["bytes_per_token"]
    assert got["fp8"]["tokens"] == perplexity(model, ids, **kw)["tokens"]


def test_multiple_choice_through_the_cache():
    """Continuations scored through LatentKVCache decode steps (a batch of
    different lengths, right-padded): the 16-bit (here float32) cache gives
    the full forward's log-likelihoods; fp8 and int4 move them, fp8 less."""
    from mha2mla.evaluation import loglikelihoods

    model = _model()
    g = torch.Generator().manual_seed(0)
    encoded = [(torch.randint(0, 97, (n_ctx,), generator=g).tolist(), torch.randint(0, 97, (n_cont,), generator=g).tolist())
               for n_ctx, n_cont in [(5, 3), (17, 1), (9, 6), (30, 2), (2, 4)]]
    pairs = [("context", "continuation")] * len(encoded)
    full = torch.tensor(loglikelihoods(model, None, pairs, batch_size=3, encoded=encoded), dtype=torch.float64)
    got = {d: torch.tensor(loglikelihoods(model, None, pairs, batch_size=3, encoded=encoded, cache_dtype=d),
                           dtype=torch.float64) for d in ["auto", "fp8", "int4"]}
    assert torch.allclose(got["auto"], full, rtol=1e-5, atol=1e-4)
    err = {d: float((got[d] - full).abs().max()) for d in ["fp8", "int4"]}
    assert 0 < err["fp8"] < err["int4"] < 0.5 * float(full.abs().max())


def test_evaluate_refuses_cache_dtype_for_the_original(capsys):
    from mha2mla.evaluate_cli import main

    assert main(["original", "--cache-dtype", "int4", "--tasks", "wikitext"]) == 2
    assert "--cache-dtype scores through the latent cache" in capsys.readouterr().err
    assert main(["original", "--cache-dtype", "int3", "--tasks", "wikitext"]) == 2
    assert "use auto, fp8, int4" in capsys.readouterr().err
