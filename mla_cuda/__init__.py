"""mla_cuda: Multi-head Latent Attention ops over a paged latent KV cache.

Public functions (shapes in their docstrings):
  attention            absorbed MLA attention over the paged latent cache
  latent_cache_append  write c_kv and rope keys into the paged cache
  partial_rope         rotate the rope dims of q and k (differentiable)
  partial_rope_        the same, in place
  PagedLatentCache     block allocator + tensors for a whole model
The ops are also reachable as torch.ops.mla_cuda.*.
"""
from ._loader import build_info, load_extension

load_extension()

from ._ops import attention, latent_cache_append, partial_rope, partial_rope_  # noqa: E402
from .cache import PagedLatentCache  # noqa: E402

__all__ = [
    "attention",
    "latent_cache_append",
    "partial_rope",
    "partial_rope_",
    "PagedLatentCache",
    "build_info",
]
__version__ = "0.1.0"
