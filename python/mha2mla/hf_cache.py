"""LatentKVCache: a transformers `Cache` that keeps only the latent cache, so
`model.generate(..., past_key_values=LatentKVCache(model))` decodes a
converted model through mla_cuda's kernels.

How it plugs in: transformers asks a Cache for the number of tokens seen
(positions, masks) and hands it to every attention layer. MLAAttention sees a
LatentKVCache and calls `mla_attend` instead of caching K/V:
  - the first forward (the prompt) runs the full-sequence SDPA path and
    writes each real token's latent and rotated rope key with the append op;
    left-padding tokens (0 in the attention mask) are never written;
  - every later forward (new tokens, all real) appends them and runs
    absorbed attention over the paged latent cache (MLAAttention.decode),
    several tokens per sequence at once when generate passes several.
The paged cache grows by doubling when sequences outrun it (one copy of the
latents, amortised), so no maximum length has to be given up front.
"""
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mla_cuda import PagedLatentCache

from .modeling import MLAAttention, mla_layers


class _LatentLayerEntry(CacheLayerMixin):
    """A layer's slot in the Cache: no K/V tensors, only the token count
    that transformers' masks and positions need."""

    def __init__(self, owner: "LatentKVCache"):
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("LatentKVCache keeps latents only: every attention layer must be an MLAAttention "
                           "(convert the model with python/convert.py first)")

    def get_mask_sizes(self, query_length, *args) -> tuple:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self._owner.seen_tokens + q, 0

    def get_seq_length(self) -> int:
        return self._owner.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._owner.reset()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("LatentKVCache does not support beam search (greedy and sampling only)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LatentKVCache cannot be cropped (assisted decoding is not supported)")


class LatentKVCache(Cache):
    """Pass as `past_key_values` to `generate` (or to forward calls) of a
    converted model. block_size: tokens per cache block; initial_tokens:
    per-sequence room allocated at the first call (it grows as needed)."""

    def __init__(self, model, block_size: int = 16, initial_tokens: int = 256):
        attn = mla_layers(model)
        if not all(isinstance(a, MLAAttention) for a in attn):
            raise TypeError("LatentKVCache needs a converted model (MLAAttention layers); "
                            "convert it with python/convert.py first")
        self._attn = attn
        self._index = {id(a): i for i, a in enumerate(attn)}
        self.block_size, self.initial_tokens = block_size, initial_tokens
        self.seen_tokens = 0
        self.paged: Optional[PagedLatentCache] = None
        self.paged_batch = 0
        self._step = None
        super().__init__(layers=[_LatentLayerEntry(self) for _ in attn])

    # -- what transformers asks -------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        self.seen_tokens, self.paged, self._step = 0, None, None

    def bytes_per_token(self) -> int:
        return self.paged.bytes_per_token if self.paged is not None else 0

    # -- the attention itself ----------------------------------------------
    def mla_attend(self, attn: MLAAttention, x: torch.Tensor, positions: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        if attn.layer_idx == self._attn[0].layer_idx:
            self._begin_step(x, positions, mask)
        step = self._step
        layer_cache = self.paged.layers[self._index[id(attn)]]
        if step["prefill"]:
            # No padding: the mask is plain causal, and SDPA's is_causal path
            # (flash) never materialises it (a [B, 1, S, S] mask cost 5 GiB
            # of peak memory at 4096 tokens in the generate benchmark).
            out = attn.full_attention(x, positions, None if step["all_real"] else mask)
            attn.append_to_cache(x.reshape(-1, x.shape[-1]), layer_cache, step["slots"], positions.reshape(-1).contiguous())
            return out
        return attn.decode(x, positions, layer_cache, step["slots"], step["table"], step["lens"])

    def _begin_step(self, x: torch.Tensor, positions: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Once per forward (at the first layer): which tokens are real, their
        slots, and the block table every layer of this step shares."""
        B, S, _ = x.shape
        real = self._real_tokens(mask, B, S, x.device)
        prefill = self.seen_tokens == 0
        if not prefill and not bool(real.all()):
            raise ValueError("LatentKVCache: padding is only supported in the prompt (left padding)")
        if self.paged is None:
            self._allocate(B, S, x)
        elif self.paged_batch != B:
            raise ValueError(f"LatentKVCache: the batch changed from {self.paged_batch} to {B} between steps")
        counts = real.sum(1).tolist()
        ids = list(range(B))
        need = self.paged.blocks_needed(ids, counts)
        if need > self.paged.free_blocks:
            self.paged.grow(max(self.paged.num_blocks * 2, self.paged.num_blocks + need))
        slots = torch.full((B, S), -1, dtype=torch.int64, device=x.device)
        slots[real] = self.paged.reserve(ids, counts)
        self._step = dict(prefill=prefill, all_real=bool(real.all()), slots=slots.reshape(-1),
                          table=None if prefill else self.paged.block_table(ids),
                          lens=None if prefill else self.paged.seq_lens(ids))
        self.seen_tokens += S

    @staticmethod
    def _real_tokens(mask: Optional[torch.Tensor], B: int, S: int, device) -> torch.Tensor:
        """[B, S] bool: tokens that are not padding. transformers' 4-D mask
        lets query i see key i exactly when token i is not padding."""
        if mask is None or mask.dim() != 4 or mask.shape[-2] != S:
            return torch.ones(B, S, dtype=torch.bool, device=device)
        kv = mask.shape[-1]
        diag = mask[:, 0, torch.arange(S), torch.arange(kv - S, kv)]
        real = diag if diag.dtype == torch.bool else diag == 0
        return real.expand(B, S).to(device)

    def _allocate(self, B: int, S: int, x: torch.Tensor) -> None:
        a = self._attn
        per_seq = S + self.initial_tokens
        blocks = B * -(-per_seq // self.block_size)
        self.paged = PagedLatentCache(len(a), blocks, self.block_size, [m.latent_dim for m in a],
                                      2 * a[0].rope_pairs, x.dtype, x.device)
        self.paged_batch = B

