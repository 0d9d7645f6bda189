"""StaticLatentCache: the latent cache of a converted model preallocated for a
maximum batch and length, so that generate() can compile the decode step and
replay it as a CUDA graph, as transformers does for its StaticCache:

    cache = StaticLatentCache(model, max_batch_size=16, max_cache_len=1024)
    model.generate(**batch, **cache.as_kwargs(), max_new_tokens=256)
    cache.reset()  # before the same object serves another generate() call

On a GPU, generate() compiles the decode forward (torch.compile,
mode="reduce-overhead") because the cache is `is_compileable`; on the CPU it
runs eagerly. max_cache_len bounds the padded prompt plus the new tokens, as
for StaticCache.

Layout. One paged latent tensor per layer, [max_batch_size * blocks_per_seq,
block_size, R + 2*n_pairs] (docs/ops.md), and a fixed block table: row b of
the batch owns blocks b*blocks_per_seq ... (b+1)*blocks_per_seq - 1, so the
token at index i of sequence b (i counts its real tokens only) lives at flat
slot b*capacity + i, capacity = blocks_per_seq * block_size. Nothing is
allocated or freed per step: the lengths seq_lens [max_batch_size] and the
step's slots live in device tensors updated in place, the block table never
changes.

Positions and slots. A token's RoPE position comes from transformers
(position_ids, which generate() counts from the attention mask, so a
left-padded sequence's first real token is at position 0) and is applied when
the token is appended; its slot is its index among the sequence's real tokens.
The two are independent: left padding shifts where a sequence starts in
transformers' padded columns (what get_seq_length counts and the masks are
sized by), never its slots, and the attention kernel's seq_lens count real
tokens only.

Steps. The first forward after construction or reset() is the prefill
(eager: generate() compiles a prefill only when it is chunked): its real tokens (the attention mask's)
get slots, padding gets -1 and is never written, seq_lens become the real
counts. Every later forward is a decode step: its tokens are all real (what
generate() passes) and go at each sequence's own length. With a chunked
prefill (generate(..., prefill_chunk_size=N)) the chunks after the first are
decode steps of N tokens; while some prompt is still in its left padding
(longer than the chunks so far) a step reads the mask, eagerly, and its
padding gets no slots. The first layer of a forward (layer_idx 0) makes the step's plan: on a decode step it writes the
slots into a preallocated buffer and advances seq_lens and the token count in
place, with no host sync and no tensor built from Python data, so the step
can be traced once and captured; the other layers read the same buffers.

Beam search (reordering), assisted decoding (cropping) and a batch that
changes between steps are refused, as by LatentKVCache.
"""
from typing import Optional

import torch

from transformers.cache_utils import Cache

from mla_cuda.cache_format import resolve_cache_format, row_bytes

from .cache import _LatentLayerEntry, check_leading_padding, latent_cache_shapes
from .modeling import LatentCache, LatentStepPlan, mla_layers, real_tokens, refresh_decode_weights


def _static_address(tensors) -> None:
    # A fixed data pointer lets the compiled step mutate these tensors in
    # place and still be captured as a CUDA graph (a mutated input that is not
    # static makes torch.compile skip cudagraphs); not allowed while tracing.
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class _StaticLatentLayerEntry(_LatentLayerEntry):
    """A layer's slot in the Cache: what transformers' masks and compile
    checks ask of a static layer (masks as wide as max_cache_len)."""

    is_compileable = True

    def __init__(self, owner: "StaticLatentCache"):
        super().__init__(owner)
        self.is_initialized = True  # preallocated: nothing for early_initialization to do

    def get_mask_sizes(self, query_length, *args) -> tuple:
        return self._owner.get_mask_sizes(query_length)

    def get_seq_length(self):
        return self._owner.get_seq_length()

    def get_max_length(self) -> int:
        return self._owner.max_cache_len


class StaticLatentCache(Cache, LatentCache):
    """Pass to `generate` (or to forward calls) of a converted model through
    `**cache.as_kwargs()`. max_batch_size: most sequences of one call;
    max_cache_len: most tokens per sequence, padded prompt plus new tokens;
    block_size: tokens per cache block; dtype, device: of the cache, the
    model's by default; cache_dtype: "auto" (dtype), "fp8", "int4" or
    "int4-g<N>": latents quantized as appended (rope keys stay in dtype),
    as for LatentKVCache."""

    def __init__(self, model, max_batch_size: int, max_cache_len: int, block_size: int = 16,
                 dtype: Optional[torch.dtype] = None, device=None, cache_dtype="auto"):
        self.latent_dims, self.rope_dim, self.argument_name = latent_cache_shapes(model, type(self).__name__)
        self._attention_layers = mla_layers(model)
        if min(max_batch_size, max_cache_len, block_size) <= 0:
            raise ValueError(f"StaticLatentCache: max_batch_size ({max_batch_size}), max_cache_len "
                             f"({max_cache_len}) and block_size ({block_size}) must be positive")
        param = next(model.parameters())
        dtype = dtype or param.dtype
        device = torch.device(device) if device is not None else param.device
        store, self.cache_format = resolve_cache_format(cache_dtype, dtype)
        self.model_dtype = dtype
        # stored privately: transformers' Cache exposes both as read-only properties (5.17)
        self._max_batch_size, self._max_cache_len = max_batch_size, max_cache_len
        self.blocks_per_seq = -(-max_cache_len // block_size)
        self.capacity = self.blocks_per_seq * block_size  # slots per sequence
        num_blocks = max_batch_size * self.blocks_per_seq
        self.latents = [torch.zeros(num_blocks, block_size, row_bytes(self.cache_format, r, self.rope_dim, dtype)
                                    // store.itemsize, dtype=store, device=device) for r in self.latent_dims]
        # block_table[b] = b*blocks_per_seq + arange(blocks_per_seq): [max_batch_size, blocks_per_seq] int32
        self.block_table = torch.arange(num_blocks, dtype=torch.int32, device=device).view(max_batch_size, -1)
        # real tokens cached per sequence: [max_batch_size] int32 (the kernel's seq_lens)
        self.seq_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        # tokens forwarded, padding included: transformers' column count (get_seq_length), 0-dim int64
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=device)
        # first slot of each sequence [max_batch_size, 1] and token offsets within a step [max_cache_len], int64
        self._seq_start = (torch.arange(max_batch_size, dtype=torch.int64, device=device) * self.capacity)[:, None]
        self._step_offsets = torch.arange(max_cache_len, dtype=torch.int64, device=device)
        # the current step's slots, flat [batch*q_len] at the front: [max_batch_size * max_cache_len] int64
        self._slots = torch.full((max_batch_size * max_cache_len,), -1, dtype=torch.int64, device=device)
        _static_address(self.latents + [self.block_table, self.seq_lens, self.cumulative_length, self._seq_start,
                                        self._step_offsets, self._slots])
        super().__init__(layers=[_StaticLatentLayerEntry(self) for _ in self.latent_dims])
        self._empty = True  # nothing cached: the next forward is a prefill
        self._batch = 0
        self._prefill_plan: Optional[LatentStepPlan] = None
        self._rows_waiting = False  # some sequence has no real token cached yet (still in its left padding)
        self._step_real: Optional[torch.Tensor] = None

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    # -- what transformers asks -------------------------------------------
    @property
    def is_compileable(self) -> bool:
        return True

    def get_seq_length(self, layer_idx: int = 0):
        """Tokens forwarded so far, padding included (transformers' columns),
        a 0-dim device tensor once anything is cached, as StaticCache's: an
        int would be specialised on by torch.compile and recompile every
        step."""
        return 0 if self._empty else self.cumulative_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple:
        """(kv_length, kv_offset) = (max_cache_len, 0), as StaticCache. Asked
        before the prefill's forward, so a prompt that does not fit is
        refused before any work."""
        if self._empty:
            q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
            self._check_prompt(q)
        return self.max_cache_len, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empties the cache for another generate() call, in place (the
        tensors keep their addresses, so a compiled step stays valid). Old
        latent rows are not cleared: attention never reads past seq_lens."""
        self.seq_lens.zero_()
        self.cumulative_length.zero_()
        refresh_decode_weights(self._attention_layers)  # in place: a compiled step stays valid
        self._empty, self._batch, self._prefill_plan = True, 0, None
        self._rows_waiting, self._step_real = False, None

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers, in this cache's format
        (scales and row padding included)."""
        return sum(t.shape[-1] for t in self.latents) * self.latents[0].element_size()

    # -- what MLAAttention asks (modeling.LatentCache) -----------------------
    def step_plan(self, layer_idx: int, hidden_states: torch.Tensor,
                  attention_mask: Optional[torch.Tensor]) -> LatentStepPlan:
        batch, q_len, _ = hidden_states.shape
        if self._empty:
            if layer_idx == 0:
                self._prefill_plan = self._plan_prefill(hidden_states, attention_mask)
            plan = self._prefill_plan
            if layer_idx == len(self.latents) - 1:  # the prefill's last layer: every later forward decodes
                self._empty, self._prefill_plan = False, None
            return plan
        if layer_idx == 0:
            self._step_real = self._advance(batch, q_len, hidden_states.device, attention_mask)
        return LatentStepPlan(prefill=False, all_real=self._step_real is None, slots=self._slots[: batch * q_len],
                              block_table=self.block_table[:batch], seq_lens=self.seq_lens[:batch],
                              real=self._step_real)

    def layer_cache(self, layer_idx: int) -> torch.Tensor:
        return self.latents[layer_idx]

    def _check_prompt(self, seq: int, batch: Optional[int] = None) -> None:
        if seq > self.max_cache_len:
            raise ValueError(f"StaticLatentCache: the prompt has {seq} tokens (padding included), more than "
                             f"max_cache_len={self.max_cache_len}; make a cache with max_cache_len >= prompt length "
                             "+ max_new_tokens")
        if batch is not None and batch > self.max_batch_size:
            raise ValueError(f"StaticLatentCache: a batch of {batch} sequences, more than max_batch_size="
                             f"{self.max_batch_size}; make a cache with a larger max_batch_size")

    def _plan_prefill(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> LatentStepPlan:
        """The prompt's slots: real tokens at 0, 1, ... of their sequence, -1
        for padding; seq_lens become the real counts. Eager, once per
        generate(), so it may read data (all_real)."""
        batch, seq, _ = x.shape
        self._check_prompt(seq, batch)
        # the prompt fills transformers' columns 0..seq-1 of the max_cache_len-wide mask
        real = real_tokens(mask, batch, seq, x.device, first_key=0)
        index = real.cumsum(1) - 1  # index of each real token among its sequence's real tokens
        slots = torch.where(real, self._seq_start[:batch] + index, -1).reshape(-1)
        counts = real.sum(1)
        self.seq_lens.zero_()
        self.seq_lens[:batch].copy_(counts)
        self.cumulative_length.fill_(seq)
        self._batch = batch
        # a prompt whose left padding outlasts this forward (the first chunk
        # of a chunked prefill) leaves padding for the next ones
        self._rows_waiting = bool((counts == 0).any())
        return LatentStepPlan(prefill=True, all_real=bool(real.all()), slots=slots)

    def _advance(self, batch: int, q_len: int, device, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A decode step of q_len tokens per sequence: their slots go after
        each sequence's real tokens, then seq_lens and the token count move
        on. In place, no host sync: capturable. Only while some prompt is
        still in its left padding (the chunks of a chunked prefill) does it
        read the mask (eager): then it returns the step's real tokens
        [batch, q_len] bool, padding gets slot -1; otherwise None."""
        if batch != self._batch:
            raise ValueError(f"StaticLatentCache: the batch changed from {self._batch} to {batch} between steps; "
                             "call reset() before a new batch")
        # a device-side check (no sync): the step must fit in max_cache_len, as in StaticCache
        torch._assert_async(self.cumulative_length + q_len <= self.max_cache_len,
                            "StaticLatentCache: generation ran past max_cache_len; make a cache with max_cache_len >= "
                            "prompt length + max_new_tokens")
        lens = self.seq_lens[:batch]
        real = None
        if self._rows_waiting:
            real = real_tokens(mask, batch, q_len, device, first_key=int(self.cumulative_length))
            if bool(real.all()):
                real = None
            else:
                check_leading_padding(real, lens, type(self).__name__)
        if real is None:
            slots = self._seq_start[:batch] + lens[:, None] + self._step_offsets[:q_len]  # [batch, q_len] int64
            lens.add_(q_len)
        else:
            index = lens[:, None] + real.cumsum(1) - 1
            slots = torch.where(real, self._seq_start[:batch] + index, -1)
            lens.add_(real.sum(1).to(lens.dtype))
        if self._rows_waiting:
            self._rows_waiting = bool((lens == 0).any())
        self._slots[: batch * q_len].copy_(slots.reshape(-1))
        self.cumulative_length.add_(q_len)
        return real

