"""The latent rotation folded into kv_down / k_up / v_up at conversion
(python/mha2mla/latent_rotation.py): orthogonal, logits unchanged to float64
rounding (full forwards and decoding through the latent cache), recorded in
the checkpoint, and what it is for: even channel variance, so a per-token
int4 scale loses less."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model  # noqa: E402
from mha2mla.latent_rotation import rotate_latents, rotation_matrix  # noqa: E402
from test_conversion import logits, rel, stats_for, tiny_model  # noqa: E402
from test_generation import teacher_forced_rel_errors  # noqa: E402


@pytest.mark.parametrize("kind,R", [("hadamard", 64), ("hadamard", 96), ("hadamard", 7), ("random", 48)])
def test_rotation_is_orthogonal_and_mixes_the_spectrum(kind, R):
    h = rotation_matrix(kind, R, seed=3)
    assert torch.allclose(h @ h.T, torch.eye(R, dtype=torch.float64), atol=1e-12)
    # a latent whose variance decays 10^4-fold over its channels: after the
    # rotation no channel holds more than a few times the mean variance
    var = torch.logspace(0, -4, R, dtype=torch.float64)
    rotated = (h**2) @ var
    if R & (R - 1) == 0 or kind == "random" or R % 2 == 0:
        assert float(rotated.max() / rotated.mean()) < 4
    assert torch.equal(rotation_matrix(kind, R, seed=3), h)  # deterministic


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_attention_maps_unchanged_in_float64_and_logits_in_float32(kind):
    """What the logits depend on, the maps x -> k_nope = k_up kv_down x and
    x -> v = v_up kv_down x, is unchanged to float64 rounding (the ops take
    no float64, so the model itself is compared in float32: full forwards
    and decoding through the latent cache)."""
    model = tiny_model("qwen2")  # q/k/v biases: v_up's bias must pass through unchanged
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6, latent_rotation="none"), progress=False)
    wide = copy.deepcopy(model).double()
    rotate_latents(wide, kind, seed=1)
    for a0, a1 in zip(model.model.layers, wide.model.layers):
        a0, a1 = a0.self_attn, a1.self_attn
        down0 = a0.kv_down.weight.double()
        assert not torch.allclose(a1.kv_down.weight, down0)  # the latent did change
        assert torch.allclose(a1.k_up @ a1.kv_down.weight, a0.k_up.double() @ down0, rtol=0, atol=1e-12)
        assert torch.allclose(a1.v_up.weight @ a1.kv_down.weight, a0.v_up.weight.double() @ down0, rtol=0, atol=1e-12)
    ids = torch.randint(0, 97, (2, 12))
    rotated = copy.deepcopy(model)
    record = rotate_latents(rotated, kind, seed=1)
    assert rotated.config.mla["latent_rotation"] == [record] and record["kind"] == kind
    assert rel(logits(rotated, ids), logits(model, ids)) < 1e-5
    assert max(teacher_forced_rel_errors(rotated, ids, chunks=(4, 1, 3))) < 1e-5


def test_conversion_option_and_checkpoint_record(tmp_path):
    from mha2mla.checkpoint import load_mla_model, save_mla_model

    model = tiny_model()
    block = convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=8, latent_rotation="hadamard"),
                          progress=False)
    assert block["latent_rotation"] == [dict(kind="hadamard", seed=None)]
    reference = tiny_model()
    convert_model(reference, stats_for(reference), ConversionOptions(r=2, d_kv=8), progress=False)
    ids = torch.randint(0, 97, (2, 10))
    assert rel(logits(model, ids), logits(reference, ids)) < 1e-5  # float32 rounding
    save_mla_model(model, str(tmp_path / "ckpt"))
    loaded = load_mla_model(str(tmp_path / "ckpt"))
    assert loaded.config.mla["latent_rotation"] == block["latent_rotation"]
    with pytest.raises(ValueError, match="latent_rotation must be one of"):
        convert_model(tiny_model(), None, ConversionOptions(r=2, d_kv=8, whiten=False, rope_strategy="high",
                                                            latent_rotation="givens"), progress=False)


def test_rotation_lowers_int4_error_of_a_decaying_latent():
    """A conversion whose latent channels decay (whitened SVD): the int4
    cache's teacher-forced logit error is smaller after the rotation."""
    model = tiny_model("gqa")
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=8), progress=False)
    rotated = copy.deepcopy(model)
    rotate_latents(rotated, "hadamard")
    ids = torch.randint(0, 97, (3, 24))
    from mha2mla import LatentKVCache

    err = [max(teacher_forced_rel_errors(m, ids, chunks=(2,) + (2,) * 11, cache=LatentKVCache(m, cache_dtype="int4"))[1:])
           for m in (model, rotated)]
    assert err[1] < err[0], err
