"""Conversion exactness and checkpoint I/O on tiny random Llama-family models."""
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model, load_mla_model, save_mla_model  # noqa: E402
from mha2mla.calibration import collect_statistics  # noqa: E402
from mha2mla.checkpoint import CheckpointError  # noqa: E402
from mha2mla.modeling import MLAAttention, kv_cache_bytes_per_token  # noqa: E402
from mha2mla.source import UnsupportedModelError, check_supported  # noqa: E402


def tiny_model(kind="gqa", tied=False, seed=0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=97, head_dim=16,
                  num_attention_heads=4, tie_word_embeddings=tied, max_position_embeddings=256)
    if kind == "qwen2":  # q/k/v biases
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(num_key_value_heads=4 if kind == "mha" else 2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random biases, so they matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    return model.eval()


def stats_for(model, n=4, length=24):
    return collect_statistics(model, torch.randint(0, 97, (n, length)), batch_size=2, progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


IDS = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,tied", [("mha", False), ("gqa", True), ("gqa", False), ("qwen2", False)])
@pytest.mark.parametrize("rope,svd", [("high", "joint"), ("2norm", "split"), ("pca", "joint")])
def test_full_rank_all_frequencies_is_exact(kind, tied, rope, svd):
    model = tiny_model(kind, tied)
    ref = logits(model, IDS)
    convert_model(model, stats_for(model), ConversionOptions(rope_strategy=rope, r=8, d_kv=0, svd=svd), progress=False)
    assert isinstance(model.model.layers[0].self_attn, MLAAttention)
    assert rel(logits(model, IDS), ref) < 1e-5


@torch.no_grad()
def partial_rope_reference(attn, x, freqs_per_kv_head, inv_freq):
    """Original attention with RoPE only on the chosen frequencies (float64)."""
    n_h, n_kv, d_h = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    half, S = d_h // 2, x.shape[1]
    q = attn.q_proj(x).double().view(1, S, n_h, d_h)
    k = attn.k_proj(x).double().view(1, S, n_kv, d_h)
    v = attn.v_proj(x).double().view(1, S, n_kv, d_h)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq.double()[None]  # [S, half]

    def rot(t, heads_of):
        t = t.clone()
        for h in range(t.shape[2]):
            for i in freqs_per_kv_head[heads_of(h)]:
                c, s = torch.cos(ang[:, i]), torch.sin(ang[:, i])
                a, b = t[0, :, h, i].clone(), t[0, :, h, i + half].clone()
                t[0, :, h, i], t[0, :, h, i + half] = a * c - b * s, b * c + a * s
        return t

    q, k = rot(q, lambda h: h // (n_h // n_kv)), rot(k, lambda g: g)
    k, v = k.repeat_interleave(n_h // n_kv, 2), v.repeat_interleave(n_h // n_kv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d_h)
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v).reshape(1, S, -1)
    return o @ attn.o_proj.weight.double().T


@pytest.mark.parametrize("rope", ["2norm", "uniform", "low"])
def test_partial_rope_alone_matches_independent_reference(rope):
    model = tiny_model("gqa")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 30, 64)
    inv_freq = model.model.rotary_emb.inv_freq
    import copy

    original = copy.deepcopy(attn)
    block = convert_model(model, stats_for(model), ConversionOptions(rope_strategy=rope, r=3, d_kv=0), progress=False)
    freqs = block["frequencies_per_kv_head"][0]
    assert all(len(f) == 3 for f in freqs)
    ref = partial_rope_reference(original, x, freqs, inv_freq)
    with torch.no_grad():
        out, _ = model.model.layers[0].self_attn(x, position_ids=torch.arange(30)[None])
    assert rel(out.double(), ref) < 1e-5
    # and it is not the full-RoPE attention: the test can tell them apart
    full = partial_rope_reference(original, x, [list(range(8))] * 2, inv_freq)
    assert rel(full, ref) > 1e-3


def uneven_inputs(model):
    """Attention inputs with unequal energy per dimension (as real
    activations have): each layer's input norm scales its dimensions over
    two decades, in a shuffled order."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            dim = layer.input_layernorm.weight.numel()
            layer.input_layernorm.weight.copy_(torch.logspace(-1.5, 0.5, dim)[torch.randperm(dim, generator=g)])
    return model


def test_truncation_degrades_gracefully_and_whitening_helps():
    model = uneven_inputs(tiny_model("gqa"))
    ref = logits(model, IDS)
    stats = stats_for(model, n=8)
    errs = {}
    for whiten in (False, True):
        m = uneven_inputs(tiny_model("gqa"))
        convert_model(m, stats, ConversionOptions(rope_strategy="high", r=8, d_kv=6, whiten=whiten), progress=False)
        errs[whiten] = rel(logits(m, IDS), ref)
    assert 0 < errs[True] < 1 and 0 < errs[False] < 1
    # activation-aware SVD fits the inputs the layer sees: well below the plain SVD's error
    assert errs[True] < 0.7 * errs[False], errs


def test_cache_bytes_follow_the_formula():
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(r=1, d_kv=4), progress=False)
    kv = kv_cache_bytes_per_token(model)
    # per layer: (d_kv + 2r) * n_kv vs 2 * n_kv * d_h
    assert kv["ratio"] == pytest.approx((4 + 2) / (2 * 16))


def test_energy_rank_allocation_keeps_the_total():
    model = tiny_model("gqa")
    block = convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6, rank_allocation="energy"), progress=False)
    assert sum(block["latent_dims"]) == 2 * 12


@pytest.mark.parametrize("kind,tied", [("qwen2", False), ("gqa", True)])
def test_save_load_roundtrip_and_corruption(tmp_path, kind, tied):
    model = tiny_model(kind, tied)
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6), progress=False)
    path = str(tmp_path / "ckpt")
    save_mla_model(model, path)
    loaded = load_mla_model(path)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    # a 16-bit load casts every weight, the MLA projections included (only
    # the RoPE frequencies stay float32)
    half = load_mla_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(m.inv_freq.dtype == torch.float32 for m in (l.self_attn for l in half.model.layers))
    assert logits(half, IDS).isfinite().all()
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:  # truncated
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256|truncated"):
        load_mla_model(path)
    with pytest.raises(CheckpointError, match="cannot be read|truncated"):
        load_mla_model(path, verify=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_mla_model(str(tmp_path))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint intact."""
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6), progress=False)
    path = str(tmp_path / "ckpt")
    save_mla_model(model, path)
    before = logits(load_mla_model(path), IDS)

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom()

    monkeypatch.setattr(model.config, "save_pretrained", fail)
    with pytest.raises(Boom):
        save_mla_model(model, path, overwrite=True)
    assert torch.equal(logits(load_mla_model(path), IDS), before)
    assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []


def test_unsupported_attention_is_refused():
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, vocab_size=97, head_dim=16,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        check_supported(transformers.Qwen3ForCausalLM(cfg))
