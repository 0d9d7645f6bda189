"""mha2mla: turn a pretrained Llama-family model into Multi-head Latent
Attention (MHA2MLA, arXiv 2502.14837) and run it on the mla_cuda ops.

Data flows one way: source model -> calibration statistics -> rope selection
+ low-rank factorisation -> MLA model -> checkpoint -> evaluation/serving.
"""
from .checkpoint import load_mla_model, save_mla_model
from .converter import ConversionOptions, convert_model
from .modeling import MLAAttention

__all__ = ["ConversionOptions", "convert_model", "MLAAttention", "load_mla_model", "save_mla_model"]
