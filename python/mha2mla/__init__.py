"""mha2mla: turn a pretrained Llama-family model into Multi-head Latent
Attention (MHA2MLA, arXiv 2502.14837) and run it on the mla_cuda ops.

Data flows one way: source model -> calibration statistics -> rope selection
+ low-rank factorisation -> MLA model -> checkpoint -> evaluation/serving.

Importing the package registers the converted families' model classes with
transformers (modeling.py), so `AutoModelForCausalLM.from_pretrained` loads a
converted checkpoint. The conversion code is imported only when
ConversionOptions or convert_model is first used: loading and serving a
checkpoint never import it.
"""
from .checkpoint import load_mla_model, save_mla_model
from .modeling import MLAAttention

__all__ = ["ConversionOptions", "convert_model", "LatentKVCache", "MLAAttention", "StaticLatentCache",
           "load_mla_model", "save_mla_model"]


def __getattr__(name):
    if name in ("ConversionOptions", "convert_model"):
        from . import converter

        return getattr(converter, name)
    if name == "LatentKVCache":
        from .cache import LatentKVCache

        return LatentKVCache
    if name == "StaticLatentCache":
        from .static_cache import StaticLatentCache

        return StaticLatentCache
    raise AttributeError(f"module 'mha2mla' has no attribute {name!r}")
