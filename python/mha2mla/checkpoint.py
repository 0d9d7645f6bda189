"""Checkpoint I/O (docs/checkpoint.md): config.json with an `mla` block,
model.safetensors (never pickle), tokenizer and generation config, and
checkpoint_files.json, the list of what the save wrote.

Saves are atomic: everything is written to a temporary folder beside the
target and renamed into place, so an interrupted save never leaves a
checkpoint that loads half-written. A save never removes a file it did not
write: it refuses a non-empty folder that is not a checkpoint, replaces an
existing checkpoint only when asked to (overwrite=True), and then carries
over every file of the old folder that the old checkpoint's manifest does
not list (the user's)."""
import hashlib
import json
import os
import re
import secrets
import shutil

import torch

WEIGHTS = "model.safetensors"
MANIFEST = "checkpoint_files.json"
# What a checkpoint saved without a manifest holds: the only entries a
# replacement removes from such a folder.
UNLISTED_CHECKPOINT_FILES = frozenset({
    "config.json", WEIGHTS, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "trainer_state.pt", "conversion_report.json", "conversion_report.md", "rope_frequencies.png",
})


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, truncated, corrupted or not ours."""


class OutputFolderError(ValueError):
    """A save target that cannot be written without losing what is there."""


class CheckpointExistsError(OutputFolderError):
    """A save target that holds a checkpoint, saved to without overwrite=True.
    The message names the Python argument; a command line says its own flag
    instead (cli_args.error_line)."""

    def __init__(self, path: str):
        super().__init__(f"{path} already holds a checkpoint: pass overwrite=True to replace it, or save to another "
                         "path")
        self.path = path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_entries(path: str):
    """The entries of folder `path` that a save wrote (its manifest, or the
    usual checkpoint files for a checkpoint saved without one), or None when
    the folder is not a checkpoint."""
    manifest = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                return set(json.load(f)["files"]) | {MANIFEST}
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputFolderError(f"{manifest} is unreadable: move the folder away or choose another output") from None
    try:
        read_mla_block(path)
    except CheckpointError:
        return None
    return set(UNLISTED_CHECKPOINT_FILES)


def check_output_folder(path: str, overwrite: bool = False) -> None:
    """Raises OutputFolderError (one line) when saving a checkpoint at `path`
    would lose something: `path` is a file, a non-empty folder that is not a
    checkpoint, or a checkpoint and overwrite is False (CheckpointExistsError).
    Cheap: commands call it before any heavy work."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputFolderError(f"{path} exists and is not a folder: choose another output")
    if not os.listdir(path):
        return
    if _checkpoint_entries(path) is None:
        raise OutputFolderError(f"{path} is a non-empty folder that is not a checkpoint: choose another output "
                                "(a new or empty folder)")
    if not overwrite:
        raise CheckpointExistsError(path)


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _normal_file_modes(folder: str) -> None:
    """Gives the files under `folder` the mode a new file gets (the umask's),
    where a writer made them private (safetensors writes 0600)."""
    mode = _default_dir_mode() & 0o666
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                os.chmod(p, mode)


def _stale_pattern(kind: str, name: str):
    """Names of the temporary folders of saves into `name`: .tmp-<name>-<8 hex>
    (being written) and .old-<name>-<8 hex> (the replaced checkpoint). The
    exact suffix keeps those of another target (`name-2`) out."""
    return re.compile(r"\." + kind + "-" + re.escape(name) + r"-[0-9a-f]{8}\Z")


def _move_entries(src: str, dst: str, names) -> None:
    for name in names:
        os.rename(os.path.join(src, name), os.path.join(dst, name))


def _recover_stale(parent: str, name: str) -> None:
    """Cleans what a killed save into parent/name left: its temporary folders
    (only files it wrote) are removed; a replaced checkpoint (.old-) is put
    back when the new one never arrived, else the user's files in it move
    into the checkpoint and the rest is removed."""
    path = os.path.join(parent, name)
    tmp_re, old_re = _stale_pattern("tmp", name), _stale_pattern("old", name)
    for entry in sorted(os.listdir(parent)):
        stale = os.path.join(parent, entry)
        if not os.path.isdir(stale) or os.path.islink(stale):
            continue
        if tmp_re.match(entry):
            shutil.rmtree(stale, ignore_errors=True)
        elif old_re.match(entry):
            if not os.path.lexists(path):
                os.rename(stale, path)
                continue
            ours = _checkpoint_entries(stale) or set(UNLISTED_CHECKPOINT_FILES)
            present = set(os.listdir(path))
            users = [e for e in os.listdir(stale) if e not in ours and e not in present]
            _move_entries(stale, path, users)
            for e in os.listdir(stale):
                if e not in ours:
                    continue
                p = os.path.join(stale, e)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.remove(p)
            try:
                os.rmdir(stale)  # left in place if a name clash kept a user's file there
            except OSError:
                pass


def _drop_source_quantization(config_path: str) -> None:
    """A source loaded from GGUF (or another quantized format) leaves its
    quantization_config in the config, but a converted checkpoint's weights
    are dense: kept, it would make from_pretrained attach the source's
    quantizer to them."""
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.pop("quantization_config", None) is not None:
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")


def save_mla_model(model, path: str, tokenizer=None, extra_files: dict = None, write_more=None,
                   overwrite: bool = False) -> None:
    """Writes model (with its config.mla block), tokenizer, extra text files
    {name: content} and whatever write_more(tmp_dir) adds (training state,
    reports) to the folder `path` atomically, with the manifest of what it
    wrote. An existing checkpoint at `path` is replaced only with
    overwrite=True, and the files in it that its save did not write stay;
    any other non-empty folder is refused (check_output_folder)."""
    from safetensors.torch import save_model

    if not hasattr(model.config, "mla"):
        raise ValueError("model has no `mla` config block: convert it first")
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _recover_stale(parent, name)
    check_output_folder(path, overwrite)
    suffix = secrets.token_hex(4)
    tmp = os.path.join(parent, f".tmp-{name}-{suffix}")
    os.mkdir(tmp, _default_dir_mode())  # mode through the umask, as any new folder (mkdtemp's is 0700)
    try:
        save_model(model, os.path.join(tmp, WEIGHTS))
        model.config.mla["weights_sha256"] = file_sha256(os.path.join(tmp, WEIGHTS))
        model.config.save_pretrained(tmp)
        _drop_source_quantization(os.path.join(tmp, "config.json"))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file_name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, file_name), "w") as f:
                f.write(content)
        if write_more is not None:
            write_more(tmp)
        written = sorted(e for e in os.listdir(tmp) if e != MANIFEST)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"files": written}, f, indent=1)
        _normal_file_modes(tmp)
        _put_in_place(tmp, path, suffix, set(written) | {MANIFEST})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp: str, path: str, suffix: str, written: set) -> None:
    """Renames the finished folder `tmp` to `path`. An old checkpoint there
    is first renamed aside (.old-), then the entries its save did not write
    move into the new folder, then the rest of it is removed: at every
    instant each file of the user's is in exactly one folder."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    ours = _checkpoint_entries(path)
    if ours is None:  # an empty folder (check_output_folder refused anything else)
        os.rmdir(path)
        os.rename(tmp, path)
        return
    users = [e for e in os.listdir(path) if e not in ours]
    clash = sorted(set(users) & written)
    if clash:
        raise OutputFolderError(f"{os.path.join(path, clash[0])} is not a checkpoint file, but the new checkpoint "
                                "writes one of that name: move it away and save again")
    parent, name = os.path.split(path)
    old = os.path.join(parent, f".old-{name}-{suffix}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _move_entries(old, path, users)
    shutil.rmtree(old, ignore_errors=True)


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
