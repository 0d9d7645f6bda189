"""StaticLatentCache: generate() of a converted model through the
preallocated latent cache equals generation through LatentKVCache and by
full forwards, token for token in float32; the decode step traces into one
graph that torch.compile reuses for every step and every generate() call."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import LatentKVCache, StaticLatentCache  # noqa: E402
from test_generation import _converted, _padded_batch, no_deprecation_warnings, teacher_forced_rel_errors  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0)


def _generate_three_ways(model, ids, mask, cache, **kw):
    """(full forwards, LatentKVCache, the static cache) outputs of one generate."""
    kw = dict(attention_mask=mask, **GREEDY, **kw)
    want = model.generate(ids, use_cache=False, **kw)
    dynamic = model.generate(ids, **LatentKVCache(model).as_kwargs(), **kw)
    with no_deprecation_warnings():
        got = model.generate(ids, **cache.as_kwargs(), **kw)
    return want, dynamic, got


@pytest.mark.parametrize("kind,rope", [("gqa", "2norm"), ("qwen2", "pca"), ("mha", "high")])
def test_static_generate_matches_dynamic_cache_and_full_forward(kind, rope):
    """Left-padded batch of prompts of 9, 5 and 2 real tokens, fewer
    sequences than the cache holds, more new tokens than the longest prompt:
    the same tokens as LatentKVCache and as full forwards. Padding never
    reaches the cache: each sequence holds its real tokens only, while the
    token count transformers sees includes the padding."""
    model = _converted(kind, rope=rope)
    ids, mask = _padded_batch()
    cache = StaticLatentCache(model, max_batch_size=4, max_cache_len=32, block_size=4)
    want, dynamic, got = _generate_three_ways(model, ids, mask, cache, max_new_tokens=20)
    assert torch.equal(dynamic, want) and torch.equal(got, want)
    real = mask.sum(1) + 20 - 1  # the last generated token is never fed back
    assert cache.seq_lens.tolist() == real.tolist() + [0]
    assert int(cache.get_seq_length()) == ids.shape[1] + 20 - 1
    assert cache.get_mask_sizes(1, 0) == (32, 0) and cache.get_max_cache_shape() == 32
    assert cache.is_compileable


def test_static_generate_without_padding_and_with_eos():
    """No padding (generate drops the all-ones mask, so the prefill gets
    none), and stopping at EOS: a sequence that emits EOS is padded after it,
    generation ends when all have."""
    model = _converted()
    ids, mask = _padded_batch(3)
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=40)
    want, dynamic, got = _generate_three_ways(model, ids[:2], torch.ones_like(mask[:2]), cache, max_new_tokens=8)
    assert torch.equal(got, want) and torch.equal(dynamic, want)
    # EOS: a token the first sequence emits at its third step, as eos_token_id
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, use_cache=False, **GREEDY)
    eos = int(free[0, ids.shape[1] + 2])
    cache.reset()
    want, dynamic, got = _generate_three_ways(model, ids, mask, cache, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(got, want) and torch.equal(dynamic, want)
    new = got[0, ids.shape[1]:]
    stop = int((new == eos).nonzero()[0])
    assert stop <= 2 and (new[stop + 1:] == 0).all()


def test_static_cache_serves_another_generate_after_reset():
    """reset() zeroes the lengths in place: the same object (same tensors)
    then serves a new batch of another size and length."""
    model = _converted()
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=24)
    addresses = [t.data_ptr() for t in cache.latents + [cache.seq_lens, cache.cumulative_length]]
    ids, mask = _padded_batch(0)
    want, _, got = _generate_three_ways(model, ids, mask, cache, max_new_tokens=10)
    assert torch.equal(got, want)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.seq_lens.any()
    ids, mask = _padded_batch(4)
    ids, mask = ids[1:, 2:], mask[1:, 2:]  # 2 sequences of 7 columns, 5 and 2 real tokens
    want, _, got = _generate_three_ways(model, ids, mask, cache, max_new_tokens=12)
    assert torch.equal(got, want)
    assert cache.seq_lens.tolist() == (mask.sum(1) + 11).tolist() + [0]
    assert [t.data_ptr() for t in cache.latents + [cache.seq_lens, cache.cumulative_length]] == addresses


def test_static_sampling_matches_dynamic_cache():
    """Sampling with the same seed draws the same tokens through both caches
    (their logits agree to rounding)."""
    model = _converted()
    ids, mask = _padded_batch(1)
    kw = dict(attention_mask=mask, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(5)
    dynamic = model.generate(ids, **LatentKVCache(model).as_kwargs(), **kw)
    torch.manual_seed(5)
    got = model.generate(ids, **StaticLatentCache(model, max_batch_size=3, max_cache_len=20).as_kwargs(), **kw)
    assert torch.equal(got, dynamic) and got.shape == (3, 17)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
def test_static_teacher_forced_logits_match_full_forward(dtype, tolerance):
    """Decode steps of one and of several tokens per sequence (causal among
    themselves); bf16 within the tolerance of test_generation's bf16 test."""
    model = _converted("gqa", rope="pca").to(dtype)
    ids, _ = _padded_batch(2)
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=9, block_size=4)
    assert cache.latents[0].dtype == dtype
    errors = teacher_forced_rel_errors(model, ids, chunks=(4, 1, 3, 1), cache=cache)
    assert max(errors) < tolerance, errors


def test_static_cache_refuses_what_does_not_fit_before_any_work():
    """A prompt longer than max_cache_len or a batch over max_batch_size is
    refused with the sizes to change, before the model runs a layer; a
    generation that runs past max_cache_len stops with an error."""
    model = _converted()
    ids, mask = _padded_batch()  # [3, 9]
    calls = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="max_cache_len=8"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2,
                           **StaticLatentCache(model, max_batch_size=3, max_cache_len=8).as_kwargs(), **GREEDY)
        assert not calls
        cache = StaticLatentCache(model, max_batch_size=2, max_cache_len=16)
        with pytest.raises(ValueError, match="max_batch_size=2"):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, **cache.as_kwargs())
        assert int(cache.cumulative_length) == 0 and not any(t.any() for t in cache.latents)
    finally:
        hook.remove()
    with pytest.raises(RuntimeError, match="ran past max_cache_len"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8,
                       **StaticLatentCache(model, max_batch_size=3, max_cache_len=12).as_kwargs(), **GREEDY)


def test_static_cache_bad_use_fails_clearly():
    with pytest.raises(TypeError, match="StaticLatentCache needs a converted model"):
        from test_conversion import tiny_model

        StaticLatentCache(tiny_model("gqa"), max_batch_size=1, max_cache_len=8)
    model = _converted()
    with pytest.raises(ValueError, match="must be positive"):
        StaticLatentCache(model, max_batch_size=0, max_cache_len=8)
    ids, mask = _padded_batch()
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache.as_kwargs())
        with pytest.raises(ValueError, match="batch changed from 3 to 2"):
            model(input_ids=ids[:2, :1], **cache.as_kwargs())
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="StaticLatentCache does not support beam search"):
        model.generate(ids, num_beams=2, do_sample=False, **kw,
                       **StaticLatentCache(model, max_batch_size=6, max_cache_len=16).as_kwargs())
    with pytest.raises((NotImplementedError, ValueError), match="(?i)assisted"):
        model.generate(ids[:1], attention_mask=mask[:1], assistant_model=_converted(d_kv=4), do_sample=False,
                       max_new_tokens=6, pad_token_id=0,
                       **StaticLatentCache(model, max_batch_size=1, max_cache_len=16).as_kwargs())


def test_compiled_decode_step_is_one_graph_reused_across_steps_and_calls():
    """generate() compiles the decode forward over the static cache (here on
    the CPU, with the aot_eager backend and fullgraph=True: any host sync or
    data-dependent Python in the step would break the graph and fail), once:
    every step of two generate() calls (reset() between them) replays the
    same graph, and the tokens equal the eager static path's. Every tensor the
    step writes in place is marked static, which CUDA-graph capture needs."""
    from transformers import CompileConfig

    model = _converted()
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, **GREEDY)
    cache = StaticLatentCache(model, max_batch_size=3, max_cache_len=24, block_size=4)
    eager = model.generate(ids, **cache.as_kwargs(), **kw)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    config = CompileConfig(fullgraph=True, backend=counting_backend, mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    try:
        for _ in range(2):
            cache.reset()
            assert torch.equal(model.generate(ids, **cache.as_kwargs(), compile_config=config, **kw), eager)
        assert len(graphs) == 1
        gm, inputs = graphs[0]
        # nothing in the step reads tensor data back to Python (torch.compile
        # traces such a read as a scalar node: a host sync on a GPU)
        reads = [n for n in gm.graph.nodes if (n.op == "call_method" and n.target in ("item", "tolist"))
                 or "_local_scalar_dense" in str(n.target)]
        assert not reads, reads
        written = set()
        for node in gm.graph.nodes:  # in-place tensor methods (add_, copy_) and the cache append
            appends = node.op == "call_function" and "latent_cache_append" in str(node.target)
            if appends or (node.op == "call_method" and node.target.endswith("_")):
                target = node.args[2] if appends else node.args[0]
                while target.op != "placeholder":  # a view (slice) of a graph input
                    target = target.args[0]
                written.add(target.name)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        written_inputs = [inputs[placeholders.index(name)] for name in written]
        assert len(written_inputs) >= len(cache.latents) + 3  # latents, slots, seq_lens, token count
        static = cache.latents + [cache._slots, cache.seq_lens, cache.cumulative_length]
        assert all(any(t is s for s in static) for t in written_inputs)
        assert all(hasattr(t, "_dynamo_static_input_type") for t in static)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_static_generate_matches_eager_on_cpu():
    """transformers' own compile of the decode step (inductor,
    mode="reduce-overhead"; no CUDA graphs on a CPU) lowers the cache's
    in-place writes and the mla_cuda ops: the same tokens as the eager
    static path, one graph without breaks, no recompilation in a second
    generate() call. Slow: inductor's C++ build takes about half a minute."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = _converted("gqa", rope="pca")
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=16, **GREEDY)
    cache = StaticLatentCache(model, max_batch_size=4, max_cache_len=32)
    eager = model.generate(ids, **cache.as_kwargs(), **kw)
    config = CompileConfig()
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    try:
        for _ in range(2):
            cache.reset()
            assert torch.equal(model.generate(ids, **cache.as_kwargs(), compile_config=config, **kw), eager)
            assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
