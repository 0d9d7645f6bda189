"""LatentKVCache: the transformers Cache of a converted model. It keeps only
the latent cache (docs/method.md: a latent and one rotated rope key per
token), so generate() decodes through mla_cuda's kernels:

    cache = LatentKVCache(model)
    model.generate(**batch, **cache.as_kwargs(), max_new_tokens=40)

(`as_kwargs` gives {"cache": cache} on transformers that name it so, and
{"past_key_values": cache} on earlier ones: no deprecation warning on either.)

How it plugs in. transformers asks a Cache for the number of tokens seen
(positions, masks) and hands it to every attention layer. The cache does no
attention: for each forward it makes one LatentStepPlan, which every
MLAAttention layer reads (with its latent tensor, by layer_idx) and acts on
(modeling.py says how):
  - the first forward (the prompt) is a prefill; its real tokens get slots,
    left-padding tokens (0 in the attention mask) get none and are never
    written;
  - every later forward is a decode: its tokens, several per sequence when
    generate passes several, get slots, and the plan carries the block table
    and lengths the attention kernel reads. Its tokens are all real, except
    in the chunks of a chunked prefill (generate(..., prefill_chunk_size=N)):
    a prompt whose left padding is longer than the first chunk still has
    padding in later ones, which gets no slots either.
A forward runs each layer once, so a layer asking again for a plan it
already read means the next forward has begun: the cache plans it then.
The paged cache grows by doubling when sequences outrun it (one copy of the
latents, amortised), so no maximum length has to be given up front. Beam
search (reordering), assisted decoding (cropping) and a batch that changes
between steps are refused with an error.

StaticLatentCache (static_cache.py) is the same cache preallocated for a
maximum batch and length, which generate() compiles and graph-captures.
"""
import inspect
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mla_cuda import PagedLatentCache
from mla_cuda.cache_format import resolve_cache_format, row_bytes

from .modeling import LatentCache, LatentStepPlan, MLAAttention, mla_layers, real_tokens, refresh_decode_weights


def latent_cache_shapes(model, cache_name: str) -> tuple:
    """(latent_dims: R per layer, rope_dim: 2*n_pairs, argument_name: the
    model forward's name for the cache) of a converted model, whose folded
    decode weights it brings up to date; refuses a model that is not
    converted."""
    attn = mla_layers(model)
    if not all(isinstance(a, MLAAttention) for a in attn):
        raise TypeError(f"{cache_name} needs a converted model (MLAAttention layers); "
                        "convert it with mha2mla-convert (python/convert.py) first")
    if [a.layer_idx for a in attn] != list(range(len(attn))):
        raise ValueError(f"{cache_name}: the model's attention layer_idx must count 0, 1, ... in layer order")
    # transformers >= 5.2x names the argument `cache` (and warns about `past_key_values`), earlier ones
    # know only `past_key_values`: the model's forward says which it takes
    argument_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    # eager, before generate() may compile a step
    refresh_decode_weights(attn)
    return [a.latent_dim for a in attn], 2 * attn[0].rope_pairs, argument_name


def check_leading_padding(real: torch.Tensor, cached: torch.Tensor, cache_name: str) -> None:
    """Refuses padding in a forward after the first unless it is the rest of
    a left padding: real [batch, seq] bool, cached [batch] tokens cached per
    sequence before this forward. (A chunked prefill's later chunks hold the
    left padding of prompts whose padding is longer than the first chunk.)"""
    padded = ~real.all(1)
    leading = bool((real[:, 1:] >= real[:, :-1]).all()) and not bool((cached.to(real.device)[padded] > 0).any())
    if not leading:
        raise ValueError(f"{cache_name}: padding is only supported in the prompt (left padding)")


CACHE_FORMATS = ("bf16", "fp8", "int4")  # what the conversion report states bytes per token for


def bytes_per_token_by_format(model, formats=CACHE_FORMATS) -> dict:
    """{format: cache bytes per token over all layers} of a converted model,
    the rope keys in 16 bits; for a quantized format its scales and row
    padding included (mla_cuda.cache_format)."""
    dims, rope_dim, _ = latent_cache_shapes(model, "bytes_per_token_by_format")
    out = {}
    for fmt in formats:
        quantized = fmt not in ("bf16", "fp16")
        out[fmt] = sum(row_bytes(fmt if quantized else None, r, rope_dim, torch.bfloat16) for r in dims)
    return out


class _LatentLayerEntry(CacheLayerMixin):
    """A layer's slot in the Cache: no K/V tensors, only the token count
    that transformers' masks and positions need."""

    def __init__(self, owner: "LatentKVCache"):
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(f"{type(self._owner).__name__} keeps latents only: every attention layer must be an "
                           "MLAAttention (convert the model with mha2mla-convert first)")

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
        raise NotImplementedError(f"{type(self._owner).__name__} does not support beam search: use greedy decoding "
                                  "or sampling (num_beams=1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self._owner).__name__} cannot be cropped, so assisted and prompt-lookup "
                                  "decoding are not supported: generate without assistant_model / "
                                  "prompt_lookup_num_tokens")


class LatentKVCache(Cache, LatentCache):
    """Pass to `generate` (or to forward calls) of a converted model through
    `**cache.as_kwargs()`. block_size: tokens per cache block;
    initial_tokens: per-sequence room allocated at the first call (it grows
    as needed); cache_dtype: how latents are stored: "auto" (the model
    dtype), "fp8" or "int4" (quantized as appended, dequantized by the
    attention kernel; the rope keys stay in the model dtype), "int4-g<N>"
    (a scale per N channels), or the model's own dtype by name ("bf16", ...)."""

    def __init__(self, model, block_size: int = 16, initial_tokens: int = 256, cache_dtype="auto"):
        self.latent_dims, self.rope_dim, self.argument_name = latent_cache_shapes(model, type(self).__name__)
        self.model_dtype = next(model.parameters()).dtype
        _, self.cache_format = resolve_cache_format(cache_dtype, self.model_dtype)
        for r in self.latent_dims:  # a bad group size is refused here, not at the first forward
            row_bytes(self.cache_format, r, self.rope_dim, self.model_dtype)
        self.block_size, self.initial_tokens = block_size, initial_tokens
        self.seen_tokens = 0
        self.paged: Optional[PagedLatentCache] = None
        self.paged_batch = 0
        self._plan: Optional[LatentStepPlan] = None
        self._plan_readers: set = set()
        super().__init__(layers=[_LatentLayerEntry(self) for _ in self.latent_dims])

    # -- what transformers asks -------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        self.seen_tokens, self.paged, self._plan, self._plan_readers = 0, None, None, set()

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers, in this cache's format
        (scales and row padding included)."""
        return sum(row_bytes(self.cache_format, r, self.rope_dim, self.model_dtype) for r in self.latent_dims)

    # -- what MLAAttention asks (modeling.LatentCache) -----------------------
    def step_plan(self, layer_idx: int, hidden_states: torch.Tensor,
                  attention_mask: Optional[torch.Tensor]) -> LatentStepPlan:
        if self._plan is None or layer_idx in self._plan_readers:
            self._plan = self._plan_step(hidden_states, attention_mask)
            self._plan_readers = set()
        self._plan_readers.add(layer_idx)
        return self._plan

    def layer_cache(self, layer_idx: int) -> torch.Tensor:
        return self.paged.layers[layer_idx]

    def _plan_step(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> LatentStepPlan:
        """Which tokens of this forward are real, their slots, and the block
        table every layer of the step shares."""
        batch, seq, _ = x.shape
        real = real_tokens(mask, batch, seq, x.device)
        all_real = bool(real.all())
        prefill = self.seen_tokens == 0
        if self.paged is None:
            self._allocate(batch, seq, x)
        elif self.paged_batch != batch:
            raise ValueError(f"LatentKVCache: the batch changed from {self.paged_batch} to {batch} between steps; "
                             "use a new cache for a new batch")
        ids = list(range(batch))
        if not prefill and not all_real:
            check_leading_padding(real, self.paged.seq_lens(ids), type(self).__name__)
        counts = real.sum(1).tolist()
        need = self.paged.blocks_needed(ids, counts)
        if need > self.paged.free_blocks:
            self.paged.grow(max(self.paged.num_blocks * 2, self.paged.num_blocks + need))
        slots = torch.full((batch, seq), -1, dtype=torch.int64, device=x.device)
        slots[real] = self.paged.reserve(ids, counts)
        self.seen_tokens += seq
        if prefill:
            return LatentStepPlan(prefill=True, all_real=all_real, slots=slots.reshape(-1))
        return LatentStepPlan(prefill=False, all_real=all_real, slots=slots.reshape(-1),
                              block_table=self.paged.block_table(ids), seq_lens=self.paged.seq_lens(ids),
                              real=None if all_real else real)

    def _allocate(self, batch: int, seq: int, x: torch.Tensor) -> None:
        per_seq = seq + self.initial_tokens
        blocks = batch * -(-per_seq // self.block_size)
        self.paged = PagedLatentCache(len(self.latent_dims), blocks, self.block_size, self.latent_dims,
                                      self.rope_dim, x.dtype, x.device, cache_format=self.cache_format)
        self.paged_batch = batch
