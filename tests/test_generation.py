"""Generation through the latent cache equals generation by full forwards."""
import pytest
import torch

pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model  # noqa: E402
from mha2mla.generation import decode_step, generate_greedy, new_cache, prefill  # noqa: E402
from test_conversion import stats_for, tiny_model  # noqa: E402


def greedy_by_full_forward(model, prompt, n):
    ids = prompt.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=ids[None], use_cache=False).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
    return out


@pytest.mark.parametrize("kind,rope", [("gqa", "2norm"), ("qwen2", "pca"), ("mha", "high")])
def test_latent_cache_generation_matches_full_forward(kind, rope):
    model = tiny_model(kind)
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy=rope, r=2, d_kv=6), progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (5, 17, 1)]
    got = generate_greedy(model, prompts, 12, block_size=4)
    want = [greedy_by_full_forward(model, p, 12) for p in prompts]
    assert got == want


def test_decode_logits_match_full_forward():
    """Teacher-forced: the logits of every decode step through the latent
    cache equal those of a full forward over the same tokens."""
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy="pca", r=2, d_kv=6), progress=False)
    seqs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 14)]
    cache = new_cache(model, 64, block_size=4)
    with torch.no_grad():
        full = [model(input_ids=s[None], use_cache=False).logits[0].double() for s in seqs]
        for i in range(2):
            last = prefill(model, cache, i, seqs[i][:5])
            assert float((last.double() - full[i][4]).norm() / full[i][4].norm()) < 1e-5
        for step in range(5, 9):
            logits = decode_step(model, cache, [0, 1], torch.stack([s[step] for s in seqs]))
            for i in range(2):
                ref = full[i][step]
                assert float((logits[i].double() - ref).norm() / ref.norm()) < 1e-5


def test_cache_holds_only_latents():
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(r=1, d_kv=4), progress=False)
    cache = new_cache(model, 64)
    # (d_kv * n_kv + 2r * n_kv) per layer, n_kv = 2: the formula of MHA2MLA.md 1.3
    assert cache.bytes_per_token == 2 * (4 * 2 + 2 * 1 * 2) * 4
    assert all(t.shape[-1] == 12 for t in cache.layers)


# ---- transformers generate() through LatentKVCache ----------------------
from mha2mla.hf_cache import LatentKVCache  # noqa: E402


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _converted(kind="gqa", d_kv=6):
    model = tiny_model(kind)
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy="2norm", r=2, d_kv=d_kv), progress=False)
    return model.eval()


@pytest.mark.parametrize("kind,padded", [("gqa", True), ("qwen2", True), ("gqa", False)])
def test_generate_with_latent_cache_matches_full_forward(kind, padded):
    """Greedy, left-padded batch, more new tokens than the prompt and than
    the cache first holds (it grows): token for token equal to generate
    without a cache (full forwards that rebuild K and V)."""
    model = _converted(kind)
    ids, mask = _padded_batch()
    if not padded:
        ids, mask = ids[:1], mask[:1]
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    cache = LatentKVCache(model, block_size=4, initial_tokens=3)
    got = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    assert torch.equal(got, want)
    # padding never reaches the cache: each sequence holds its real tokens only
    real = mask.sum(1) + 20 - 1  # the last generated token is never fed back
    assert cache.paged.seq_lens(list(range(len(ids)))).tolist() == real.tolist()


def test_generate_sampling_is_reproducible_and_cache_holds_only_latents():
    model = _converted()
    ids, mask = _padded_batch(1)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        cache = LatentKVCache(model)
        outs.append(model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=True, top_k=20,
                                   temperature=0.9, max_new_tokens=6, pad_token_id=0))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (3, 15)
    # no full-size K or V anywhere: the only tensors are the latent rows
    # [blocks, block_size, R + 2B] of the formula in MHA2MLA.md 1.3
    attn = model.model.layers[0].self_attn
    assert all(t.shape[-1] == attn.latent_dim + 2 * attn.rope_pairs for t in cache.paged.layers)
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)
    assert cache.bytes_per_token() == len(cache.paged.layers) * (attn.latent_dim + 2 * attn.rope_pairs) * 4


def test_latent_cache_bad_use_fails_clearly():
    with pytest.raises(TypeError, match="converted model"):
        LatentKVCache(tiny_model("gqa"))
    model = _converted()
    cache = LatentKVCache(model)
    ids, mask = _padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="batch changed"):
            model(input_ids=ids[:2, :1], past_key_values=cache)


def teacher_forced_rel_errors(model, ids):
    """Relative error of each step's last logits through the latent cache
    (prefill of 5 tokens, then 4 decode steps) against a full forward."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.double()
        cache = LatentKVCache(model)
        steps = [model(input_ids=ids[:, :5], past_key_values=cache).logits[:, -1]]
        for t in range(5, 9):
            steps.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    return [float((got.double() - full[:, 4 + i]).norm() / full[:, 4 + i].norm()) for i, got in enumerate(steps)]


def test_bf16_latent_cache_logits_close_to_full_forward():
    """bf16: teacher-forced logits through the latent cache (prefill, then
    decode steps on the kernels) against a bf16 full forward; tolerance
    1.5e-2 relative (observed up to 5.5e-3: bf16 keeps 8 bits of mantissa,
    and the two paths sum in different orders)."""
    model = _converted().to(torch.bfloat16)
    ids, _ = _padded_batch(2)
    assert max(teacher_forced_rel_errors(model, ids)) < 1.5e-2
