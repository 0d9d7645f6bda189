"""A converted checkpoint loads with AutoModelForCausalLM.from_pretrained,
round-trips through save_pretrained, and gives the same logits as
load_mla_model; checkpoints of the previous format still load."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model, load_mla_model, save_mla_model  # noqa: E402
from mha2mla.checkpoint import CheckpointError, file_sha256  # noqa: E402
from mha2mla.modeling import FORMAT_VERSION, MLAAttention  # noqa: E402
from test_conversion import IDS, logits, stats_for, tiny_model  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402


def _converted_checkpoint(tmp_path, kind, tied):
    model = tiny_model(kind, tied)
    convert_model(model, stats_for(model), ConversionOptions(r=2, d_kv=6), progress=False)
    path = str(tmp_path / "converted")
    save_mla_model(model, path)
    return model, path


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("kind,tied", [("gqa", True), ("qwen2", False)])
def test_from_pretrained_and_save_pretrained_round_trip(tmp_path, kind, tied):
    model, path = _converted_checkpoint(tmp_path, kind, tied)
    family = "llama" if kind == "gqa" else "qwen2"
    cfg = _config(path)
    assert cfg["model_type"] == "mla_" + family and cfg["mla"]["format_version"] == FORMAT_VERSION
    want = logits(model, IDS)
    ours, native = load_mla_model(path), AutoModelForCausalLM.from_pretrained(path)
    for loaded in (ours, native):
        assert type(loaded).__name__ == type(model).__name__
        assert all(isinstance(layer.self_attn, MLAAttention) for layer in loaded.model.layers)
        assert torch.equal(logits(loaded, IDS), want)
    if tied:
        assert native.lm_head.weight.data_ptr() == native.model.embed_tokens.weight.data_ptr()

    again = str(tmp_path / "saved_pretrained")
    native.save_pretrained(again)
    # the sha256 in the mla block is that of the file save_pretrained wrote
    assert _config(again)["mla"]["weights_sha256"] == file_sha256(os.path.join(again, "model.safetensors"))
    for loaded in (load_mla_model(again), AutoModelForCausalLM.from_pretrained(again)):
        assert torch.equal(logits(loaded, IDS), want)
    # and load_mla_model still verifies it
    with open(os.path.join(again, "model.safetensors"), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256"):
        load_mla_model(again)


def test_from_pretrained_16bit_keeps_rope_frequencies_float32(tmp_path):
    model, path = _converted_checkpoint(tmp_path, "gqa", False)
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for a, b in zip(half.model.layers, model.model.layers):
        assert a.self_attn.inv_freq.dtype == torch.float32 and torch.equal(a.self_attn.inv_freq, b.self_attn.inv_freq)


def test_previous_format_still_loads_and_is_saved_in_the_current_one(tmp_path):
    """Format 1: config.json of the source family (model_type "llama") plus
    the mla block. load_mla_model reads it; what it saves is format 2."""
    model, path = _converted_checkpoint(tmp_path, "gqa", True)
    cfg = _config(path)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    cfg["mla"]["format_version"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    old = load_mla_model(path)
    assert torch.equal(logits(old, IDS), logits(model, IDS))
    for save, where in ((lambda m, p: save_mla_model(m, p), "by_save_mla_model"),
                        (lambda m, p: m.save_pretrained(p), "by_save_pretrained")):
        out = str(tmp_path / where)
        save(old, out)
        saved = _config(out)
        assert saved["model_type"] == "mla_llama" and saved["mla"]["format_version"] == FORMAT_VERSION
        assert saved["architectures"] == ["MLALlamaForCausalLM"]
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), IDS), logits(model, IDS))
        assert torch.equal(logits(load_mla_model(out), IDS), logits(model, IDS))


def test_unknown_format_version_is_refused(tmp_path):
    _, path = _converted_checkpoint(tmp_path, "gqa", False)
    cfg = _config(path)
    cfg["mla"]["format_version"] = FORMAT_VERSION + 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="format version"):
        load_mla_model(path)


def test_fresh_process_loads_natively_without_conversion_code(tmp_path):
    """`import mha2mla` is all from_pretrained needs; neither it nor
    load_mla_model imports the conversion code."""
    model, path = _converted_checkpoint(tmp_path, "gqa", False)
    torch.save(IDS, str(tmp_path / "ids.pt"))
    script = f"""
import sys, torch
import mha2mla
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / "ids.pt")!r})
with torch.no_grad():
    a = AutoModelForCausalLM.from_pretrained({path!r})(input_ids=ids, use_cache=False).logits
    b = mha2mla.load_mla_model({path!r})(input_ids=ids, use_cache=False).logits
torch.save(a, {str(tmp_path / "native.pt")!r})
assert torch.equal(a, b)
conversion = ["mha2mla." + m for m in ("converter", "calibration", "lowrank", "rope_selection", "source")]
print("imported:", [m for m in conversion if m in sys.modules])
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imported: []" in run.stdout, run.stdout
    assert torch.equal(torch.load(str(tmp_path / "native.pt")), logits(model, IDS).float())
