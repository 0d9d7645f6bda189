"""Checkpoint I/O (docs/checkpoint.md): config.json with an `mla` block,
model.safetensors (never pickle), tokenizer and generation config. Saves are
atomic: everything is written to a temporary directory beside the target and
renamed into place, so an interrupted save never leaves a checkpoint that
loads half-written."""
import hashlib
import json
import os
import shutil
import tempfile

import torch

WEIGHTS = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, truncated, corrupted or not ours."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_mla_model(model, path: str, tokenizer=None, extra_files: dict = None, write_more=None) -> None:
    """Writes model (with its config.mla block), tokenizer, extra text files
    {name: content} and whatever write_more(tmp_dir) adds (training state) to
    `path` atomically."""
    from safetensors.torch import save_model

    if not hasattr(model.config, "mla"):
        raise ValueError("model has no `mla` config block: convert it first")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        save_model(model, os.path.join(tmp, WEIGHTS))
        model.config.mla["weights_sha256"] = file_sha256(os.path.join(tmp, WEIGHTS))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(content)
        if write_more is not None:
            write_more(tmp)
        old = None
        if os.path.exists(path):
            old = path + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_mla_block(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} is not a checkpoint: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is corrupted: {e}") from None
    if "mla" not in cfg:
        raise CheckpointError(f"{path} holds no MLA conversion (config.json has no 'mla' block)")
    return cfg["mla"]


def _readable_block(path: str) -> dict:
    """The checkpoint's mla block, refused when its format is not one this
    code reads."""
    from .modeling import READABLE_FORMAT_VERSIONS

    block = read_mla_block(path)
    if block.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"{path}: MLA format version {block.get('format_version')}, this code reads "
                              f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}: use the mha2mla release that wrote it")
    return block


def _empty_mla_model(path: str, block: dict, dtype, device):
    """The model a checkpoint's config.json (and its mla block, read by
    _readable_block) describes, of its family's MLA class, with
    uninitialised weights on `device` (tied weights tied, rotary tables
    built): what its state dict is loaded into. A format-1 config.json
    (the source family's model_type) is read as the current format."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import FORMAT_VERSION, mla_classes

    config = AutoConfig.from_pretrained(path)
    config_cls, _ = mla_classes(config.model_type)
    if not isinstance(config, config_cls):
        # format 1: the source family's config; the MLA config class only adds a model_type
        config.__class__ = config_cls
        config.architectures = None
    block["format_version"] = FORMAT_VERSION
    config.mla = block
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(dtype)  # the new MLAAttention modules are built float32 (inv_freq stays float32 by design)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage: tie them again
    # non-persistent buffers (the rotary tables) are not in the file: rebuild
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=config)
    model.config.architectures = [type(model).__name__]
    return model


def load_mla_model(path: str, dtype=torch.float32, device="cpu", verify: bool = True):
    """Loads a converted checkpoint into a transformers model whose attention
    modules are MLAAttention. verify=True checks the weights' sha256 first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    block = _readable_block(path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    if verify and block.get("weights_sha256") and file_sha256(weights) != block["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in config.json: truncated or corrupted")
    model = _empty_mla_model(path, block, dtype, device)
    try:
        missing, unexpected = load_model(model, weights, strict=True, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{weights} cannot be read (truncated or corrupted): {e}") from None
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not fit the model in config.json: {e}") from None
    return model.eval()


def mla_model_from_state_dict(path: str, state_dict: dict, dtype=torch.float32):
    """A CPU model of the checkpoint at `path`'s architecture holding
    `state_dict` (e.g. the full state gathered from a sharded model), for
    save_mla_model."""
    model = _empty_mla_model(path, _readable_block(path), dtype, "cpu")
    model.load_state_dict(state_dict, strict=True)
    return model
