"""Folded decode projections (mha2mla.decode_projections): the folded
weights equal the unfolded composition, decode through them equals decode
without them and full forwards, they follow weight changes and casts, never
reach a checkpoint, and the rule folds where it pays."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import LatentKVCache, MLAAttention, StaticLatentCache, load_mla_model, save_mla_model  # noqa: E402
from mha2mla.decode_projections import (chosen_sides, folded_input, folded_output, fuse_decode_weights,  # noqa: E402
                                        projection_bytes)
from test_generation import _converted, _padded_batch, teacher_forced_rel_errors  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0)


def _unfolded(attn, x, u):
    """What the folded weights replace, by the modules themselves: x [T, d]
    -> q_latent [T, n_h, R], unrotated q_rope [T, n_h, 2B], c [T, R], k_rope
    [T, 2B]; latent attention output u [T, n_h, R] -> layer output [T, d]."""
    group = attn.n_h // attn.n_kv
    q, q_rope = attn.project_queries(x)
    q_latent = torch.einsum("tgnd,gdr->tgnr", q.view(len(x), attn.n_kv, group, -1), attn.k_up).flatten(1, 2)
    v = torch.einsum("tgnr,gdr->tgnd", u.view(len(u), attn.n_kv, group, -1),
                     attn.v_up.weight.view(attn.n_kv, attn.head_dim, -1))
    if attn.v_up.bias is not None:
        v = v + attn.v_up.bias.view(attn.n_kv, 1, attn.head_dim)
    return (q_latent, q_rope, attn.kv_down(x), attn.k_rope_proj(x)), attn.o_proj(v.flatten(1))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["gqa", "qwen2", "mha"])
def test_folded_projections_equal_the_unfolded_composition(kind, dtype, tolerance):
    """Every column block of the folded input matmul (biases included: qwen2
    has q, k and v biases) and the folded output matmul equal the unfolded
    modules' result, to the dtype's rounding."""
    model = _converted(kind).to(dtype)
    attn = model.model.layers[1].self_attn
    x = torch.randn(5, attn.q_proj.in_features, dtype=dtype)
    u = torch.randn(5, attn.n_h, attn.latent_dim, dtype=dtype)
    with torch.no_grad():
        weight, bias = folded_input(attn)
        y = torch.nn.functional.linear(x, weight, bias)
        (q_latent, q_rope, c, k_rope), want_out = _unfolded(attn, x, u)
        weight, bias = folded_output(attn)
        out = torch.nn.functional.linear(u.flatten(1), weight, bias)
    R, n_h, rope = attn.latent_dim, attn.n_h, 2 * attn.rope_pairs
    blocks = y.split([n_h * R, n_h * rope, R, rope], dim=1)
    for got, want in zip(blocks + (out,), (q_latent.flatten(1), q_rope.flatten(1), c, k_rope, want_out)):
        assert got.dtype == dtype and float((got - want).norm() / want.norm()) < tolerance


@pytest.mark.parametrize("kind", ["gqa", "qwen2", "mha"])
def test_folded_decode_equals_unfolded_decode(kind):
    """float32, teacher-forced through LatentKVCache (prefill, then decode
    steps of one and of several tokens per sequence): the logits with folded
    projections equal those without to rounding, and both equal full
    forwards'. Corrupting the folded weights changes the logits: the folded
    path is the one measured."""
    model = _converted(kind, rope="pca")
    ids, _ = _padded_batch(2)
    assert fuse_decode_weights(model, "off") == [(False, False)] * 2
    unfolded = teacher_forced_rel_errors(model, ids, chunks=(4, 1, 3, 1))
    assert fuse_decode_weights(model, "on") == [(True, True)] * 2
    folded = teacher_forced_rel_errors(model, ids, chunks=(4, 1, 3, 1))
    assert max(unfolded) < 1e-5 and max(folded) < 1e-5, (unfolded, folded)
    for layer in model.model.layers:
        layer.self_attn.decode_out_weight.mul_(1.5)
    assert min(teacher_forced_rel_errors(model, ids, chunks=(4, 1, 3, 1))[1:]) > 1e-2


@pytest.mark.parametrize("cache_kind", ["latent", "static"])
def test_greedy_generate_same_tokens_folded_and_unfolded(cache_kind):
    """Greedy generate of a left-padded batch: the same tokens with folded
    and unfolded projections, through LatentKVCache and StaticLatentCache,
    equal to generation by full forwards."""
    model = _converted("qwen2")
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=16, **GREEDY)
    want = model.generate(ids, use_cache=False, **kw)

    def cache():
        return LatentKVCache(model) if cache_kind == "latent" else StaticLatentCache(model, 3, 32, block_size=4)

    for mode in ("on", "off", "auto"):
        fuse_decode_weights(model, mode)
        assert torch.equal(model.generate(ids, **cache().as_kwargs(), **kw), want), mode


def test_folded_weights_follow_weight_changes_and_casts():
    """A training step (in place, through the optimizer) and load_state_dict
    change the weights: the next prefill rebuilds the folded ones, in place
    (a captured decode step keeps reading the same tensors), and generation
    equals full forwards of the new weights. A cast (.to) rebuilds them in
    the new dtype."""
    model = _converted()
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, **GREEDY)
    fuse_decode_weights(model, "on")
    attn = model.model.layers[0].self_attn
    before = attn.decode_in_weight.clone()
    address = attn.decode_in_weight.data_ptr()

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    want = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(model.generate(ids, **LatentKVCache(model).as_kwargs(), **kw), want)
    assert attn.decode_in_weight.data_ptr() == address
    assert not torch.equal(attn.decode_in_weight, before)
    with torch.no_grad():
        assert torch.equal(attn.decode_in_weight, folded_input(attn)[0])

    other = _converted(d_kv=6, rope="high")
    model.load_state_dict(other.state_dict())
    want = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(model.generate(ids, **StaticLatentCache(model, 3, 24).as_kwargs(), **kw), want)
    with torch.no_grad():
        assert torch.equal(attn.decode_out_weight, folded_output(attn)[0])

    model.to(torch.bfloat16)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **LatentKVCache(model).as_kwargs())  # a prefill
        assert attn.decode_in_weight.dtype == torch.bfloat16
        assert torch.equal(attn.decode_in_weight, folded_input(attn)[0])


def test_folded_weights_are_never_saved(tmp_path):
    """save_mla_model and save_pretrained write the checkpoint format's
    tensors only; the loaded model folds its own again."""
    from safetensors import safe_open

    model = _converted()
    fuse_decode_weights(model, "on")
    assert model.model.layers[0].self_attn.decode_in_weight is not None
    save_mla_model(model, str(tmp_path / "a"))
    model.save_pretrained(str(tmp_path / "b"))
    for folder in ("a", "b"):
        with safe_open(os.path.join(tmp_path, folder, "model.safetensors"), "pt") as f:
            names = list(f.keys())
        assert names and not [n for n in names if "decode_" in n]
    loaded = load_mla_model(str(tmp_path / "a"))
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, **GREEDY)
    got = loaded.generate(ids, **LatentKVCache(loaded).as_kwargs(), **kw)
    assert loaded.model.layers[0].self_attn.decode_fusion_sides == (True, True)
    assert torch.equal(got, model.generate(ids, use_cache=False, **kw))


def test_decode_under_gradients_uses_the_unfolded_weights():
    """The folded weights are detached, so a decode step with gradients
    enabled (training) takes the unfolded path: with the folded weights
    corrupted, its logits are still right, while a no_grad step's are not."""
    model = _converted()
    fuse_decode_weights(model, "on")
    ids, _ = _padded_batch()
    for layer in model.model.layers:
        layer.self_attn.decode_out_weight.mul_(1.5)
    with torch.no_grad():
        want = model(input_ids=ids[:, :6], use_cache=False).logits[:, -1]

    def decode_step_logits():
        cache = LatentKVCache(model)
        with torch.no_grad():
            model(input_ids=ids[:, :5], **cache.as_kwargs())
        return model(input_ids=ids[:, 5:6], **cache.as_kwargs()).logits[:, -1].detach()

    with torch.enable_grad():
        assert torch.allclose(decode_step_logits(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(decode_step_logits(), want, rtol=1e-2, atol=1e-2)


def _layer(hidden, n_h, n_kv, head_dim, d_kv, r):
    with torch.device("meta"):
        return MLAAttention(hidden, n_h, n_kv, head_dim, n_kv * d_kv, n_kv * r, 0).to(torch.bfloat16)


def test_rule_folds_where_it_pays_and_can_be_overridden():
    """SmolLM2-135M's shape at d_kv=32: the folded input reads 1200 x 576
    weights against 736 x 576 unfolded, less than the kernels it saves cost:
    both sides folded. Llama-2-7B's at d_kv=64: the folded input is 84480 x
    4096 against 9216 x 4096: neither. "on" / "off" override the rule."""
    smol, llama = _layer(576, 9, 3, 64, 32, 4), _layer(4096, 32, 32, 128, 64, 8)
    assert projection_bytes(smol)["input"][:2] == (736 * 576 * 2, 1200 * 576 * 2)
    assert projection_bytes(llama)["input"][:2] == (9216 * 4096 * 2, 84480 * 4096 * 2)
    assert chosen_sides(smol) == (True, True)
    assert chosen_sides(llama) == (False, False)
    assert chosen_sides(llama, "on") == (True, True) and chosen_sides(smol, "off") == (False, False)
    # with launches costing nothing, only fewer bytes pays: SmolLM2 at d_kv=16 reads fewer bytes folded on the
    # output side (576 x 432 against 576 x 576 + 192 x 48) but more on the input side
    assert chosen_sides(_layer(576, 9, 3, 64, 16, 4), launch_cost_bytes=0) == (False, True)
    with pytest.raises(ValueError, match="one of"):
        chosen_sides(smol, "always")
