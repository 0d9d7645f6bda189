"""Saving a checkpoint never loses a file it did not write: a folder of the
user's is refused, a checkpoint is replaced only when asked and keeps the
user's files, what a killed save left is cleaned or put back."""
import json
import os
import stat

import pytest
import torch

pytest.importorskip("transformers")

from mha2mla import ConversionOptions, convert_model, load_mla_model, save_mla_model  # noqa: E402
from mha2mla.checkpoint import MANIFEST, OutputFolderError, check_output_folder  # noqa: E402
from test_conversion import IDS, logits, stats_for, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def converted():
    """Two different conversions of one tiny model."""
    models = []
    for d_kv in (6, 4):
        m = tiny_model("gqa")
        convert_model(m, stats_for(m), ConversionOptions(r=2, d_kv=d_kv), progress=False)
        models.append(m)
    return models


def test_a_folder_of_the_users_is_refused_and_kept(tmp_path, converted):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.txt").write_text("four years")
    with pytest.raises(OutputFolderError, match="not a checkpoint"):
        save_mla_model(converted[0], str(out))
    with pytest.raises(OutputFolderError, match="not a checkpoint"):
        save_mla_model(converted[0], str(out), overwrite=True)
    assert os.listdir(out) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "four years"
    assert os.listdir(tmp_path) == ["results"]  # no temporary folder left
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        save_mla_model(converted[0], str(tmp_path / "a_file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    save_mla_model(converted[0], str(empty))  # an empty folder is fine
    assert torch.equal(logits(load_mla_model(str(empty)), IDS), logits(converted[0], IDS))


def test_a_checkpoint_is_replaced_only_with_overwrite_and_keeps_the_users_files(tmp_path, converted):
    first, second = converted
    path = tmp_path / "ckpt"
    save_mla_model(first, str(path), extra_files={"notes.md": "first"})
    written = json.loads((path / MANIFEST).read_text())["files"]
    assert {"config.json", "model.safetensors", "notes.md"} <= set(written)
    (path / "my_eval.json").write_text("{}")
    (path / "plots").mkdir()
    (path / "plots" / "a.png").write_bytes(b"png")
    with pytest.raises(OutputFolderError, match="already holds a checkpoint: pass overwrite=True") as refusal:
        save_mla_model(second, str(path))
    assert "--overwrite" not in str(refusal.value)  # a flag of the command lines, not of this function
    with pytest.raises(OutputFolderError):
        check_output_folder(str(path))
    assert torch.equal(logits(load_mla_model(str(path)), IDS), logits(first, IDS))

    save_mla_model(second, str(path), overwrite=True)
    assert torch.equal(logits(load_mla_model(str(path)), IDS), logits(second, IDS))
    assert (path / "my_eval.json").read_text() == "{}" and (path / "plots" / "a.png").read_bytes() == b"png"
    assert not (path / "notes.md").exists()  # the old checkpoint's own file goes with it
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_checkpoint_without_manifest_keeps_everything_but_checkpoint_files(tmp_path, converted):
    path = tmp_path / "ckpt"
    save_mla_model(converted[0], str(path))
    os.remove(path / MANIFEST)  # as a checkpoint written before manifests were
    (path / "thesis.txt").write_text("mine")
    save_mla_model(converted[1], str(path), overwrite=True)
    assert (path / "thesis.txt").read_text() == "mine"
    assert torch.equal(logits(load_mla_model(str(path)), IDS), logits(converted[1], IDS))


def test_a_users_file_named_like_a_new_checkpoint_file_stops_the_save(tmp_path, converted):
    path = tmp_path / "ckpt"
    save_mla_model(converted[0], str(path))
    (path / "notes.md").write_text("mine")
    with pytest.raises(OutputFolderError, match="notes.md is not a checkpoint file"):
        save_mla_model(converted[1], str(path), extra_files={"notes.md": "generated"}, overwrite=True)
    assert (path / "notes.md").read_text() == "mine"
    assert torch.equal(logits(load_mla_model(str(path)), IDS), logits(converted[0], IDS))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_stale_temporary_folders_are_cleaned_and_modes_are_normal(tmp_path, converted):
    # what a save killed while writing leaves: a hidden, partly written folder
    stale = tmp_path / ".tmp-ckpt-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    other = tmp_path / ".tmp-ckpt-2-0123abcd"  # a save into ckpt-2, not ours to touch
    other.mkdir()
    old_umask = os.umask(0o022)
    try:
        save_mla_model(converted[0], str(tmp_path / "ckpt"))
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == [".tmp-ckpt-2-0123abcd", "ckpt"]
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(tmp_path / "ckpt" / f).st_mode) for f in os.listdir(tmp_path / "ckpt")} == {0o644}


def test_a_save_killed_between_its_renames_is_put_right_by_the_next(tmp_path, converted):
    """A kill after the old checkpoint moved aside (.old-) leaves the user's
    files there: the next save into the same place brings them back."""
    path = tmp_path / "ckpt"
    save_mla_model(converted[0], str(path))
    (path / "thesis.txt").write_text("mine")
    os.rename(path, tmp_path / ".old-ckpt-0123abcd")  # killed before the new folder arrived
    save_mla_model(converted[1], str(path), overwrite=True)
    assert (path / "thesis.txt").read_text() == "mine"
    assert torch.equal(logits(load_mla_model(str(path)), IDS), logits(converted[1], IDS))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    # killed after the new folder arrived, before the user's files moved over
    save_mla_model(converted[0], str(tmp_path / "aside"))
    (tmp_path / "aside" / "draft.txt").write_text("mine too")
    os.rename(tmp_path / "aside", tmp_path / ".old-ckpt-4567abcd")
    save_mla_model(converted[0], str(path), overwrite=True)
    assert (path / "draft.txt").read_text() == "mine too" and (path / "thesis.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_source_quantization_config_is_not_saved_with_the_dense_weights(tmp_path):
    """A source loaded from GGUF carries the GGUF's quantization_config; the
    converted checkpoint's weights are dense, so its config must not say
    otherwise (from_pretrained would attach the source's quantizer)."""
    m = tiny_model("gqa")
    convert_model(m, stats_for(m), ConversionOptions(r=2, d_kv=6), progress=False)
    m.config.quantization_config = {"quant_method": "gguf", "dequantize": False, "gguf_file": "model.Q4_1.gguf"}
    save_mla_model(m, str(tmp_path / "ckpt"))
    with open(tmp_path / "ckpt" / "config.json") as f:
        cfg = json.load(f)
    assert "quantization_config" not in cfg and "mla" in cfg
    assert torch.equal(logits(load_mla_model(str(tmp_path / "ckpt")), IDS), logits(m, IDS))
