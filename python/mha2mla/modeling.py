"""The model side of a converted checkpoint: MLAAttention (the attention
module, a drop-in for a transformers Llama-family `self_attn`), the step plan
it reads from a latent cache, and the model classes that let
`AutoModelForCausalLM.from_pretrained` load a converted checkpoint.

MLAAttention, per layer (shapes [out, in]; n_pairs = kept rope pairs):
  q_proj       [n_h*d_h, d]            the source model's, unchanged
  q_rope_map   [n_kv, 2*n_pairs, d_h]  per KV group: the query's share of each
                                       kept rope pair (first halves, then
                                       second halves: the mla_cuda layout)
  k_rope_proj  [2*n_pairs, d]          rope keys, one set shared by all heads
  kv_down      [R, d]                  latent c = kv_down x: what is cached
  k_up         [n_kv, d_h, R]          NoPE key of group g: k_up[g] c (+ k_up_bias)
  v_up         [n_kv*d_h, R]           values (+ bias)
  o_proj       [d, n_h*d_h]            unchanged
Score of head h (group g) against token t:
  (q_h . k_up[g] c_t + rot(q_rope_map[g] q_h) . rot(k_rope_t)) / sqrt(d_h).
The cache row of a token is [c (R) | rotated k_rope (2*n_pairs)]: a latent
shared by all heads plus one shared rope key (docs/method.md, docs/ops.md).

Who does what during generation. The cache (mha2mla.cache.LatentKVCache or
mha2mla.static_cache.StaticLatentCache, transformers Caches) only keeps
memory: the paged latent tensors and their block bookkeeping. For each
forward it hands every layer the same LatentStepPlan (slots for the new tokens, block table, sequence lengths,
prefill or decode, padding or not) and the layer's latent tensor by
layer_idx. MLAAttention checks the cache's type against LatentCache (the
small base class defined here, so this module needs nothing of the cache's
implementation) and does the work itself: on a prefill, full attention over
the prompt and an append of its real tokens; on a decode, append and
absorbed attention over the latent cache. Any other transformers Cache (the
DynamicCache a plain forward or generate() makes by default) gets the
up-projected K and V like any transformers attention, so such calls are
correct, only without the latent cache's memory saving.

Native loading. A converted model is of its own model_type, "mla_" + the
source family's (mla_llama, mla_qwen2, ...): its config class subclasses the
source's config class, its model class subclasses the source family's
ForCausalLM and installs MLAAttention modules (shaped by the config's `mla`
block) in __init__. Importing mha2mla registers them with AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(path)` loads a
checkpoint with transformers' own loader from safetensors, and no code from
the checkpoint folder runs. The alternative, an `auto_map` with modeling code
shipped inside the checkpoint, needs trust_remote_code=True: it executes
whatever Python the folder holds, and every checkpoint carries its own copy
of the modeling code, which goes stale as the package changes; a registered
class is reviewed once, installed with the package, and never executed from
a downloaded folder.
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mla_cuda

from . import decode_projections

# Version of the checkpoint format (docs/checkpoint.md). 2: config.json names
# the converted family's own model_type ("mla_llama") and architecture; 1 named
# the source family's (model_type "llama" + the mla block), still readable.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)


@dataclass
class LatentStepPlan:
    """What every layer of one forward needs from the latent cache.
    prefill: the first forward over these sequences (full attention over the
      new tokens, then an append); otherwise a decode step (append, then
      absorbed attention over the cache).
    all_real: no token of the step is padding (a prefill then attends with
      the plain causal mask). Decode steps are all real (generate() feeds
      only real tokens after the prompt) but for the chunks of a chunked
      prefill that `real` describes.
    slots: [batch*seq] int64 flat cache slot of each new token, -1 for
      padding (never written).
    block_table: [batch, max_blocks] int32, decode steps only.
    seq_lens: [batch] int32 cached tokens per sequence after this step's
      append, decode steps only.
    real: [batch, seq] bool, the tokens that are not padding, on a decode
      step that has padding only: a chunk of a chunked prefill
      (generation_config.prefill_chunk_size) in which some sequences are
      still in their left padding, so nothing of theirs is cached yet."""

    prefill: bool
    all_real: bool
    slots: torch.Tensor
    block_table: Optional[torch.Tensor] = None
    seq_lens: Optional[torch.Tensor] = None
    real: Optional[torch.Tensor] = None


class LatentCache:
    """What MLAAttention asks of a latent KV cache. A forward runs every
    layer once, in layer_idx order; each layer asks for the step plan and
    its own latent tensor. Implemented by mha2mla.cache.LatentKVCache (grows
    on demand) and mha2mla.static_cache.StaticLatentCache (preallocated,
    compileable: its plans of decode steps are views of device buffers
    updated in place). cache_format: None when the latent tensors hold the
    model dtype, else the quantized format of their uint8 rows ("fp8",
    "int4", ...: mla_cuda.cache_format), which the ops are told."""

    cache_format: Optional[str] = None

    def step_plan(self, layer_idx: int, hidden_states: torch.Tensor,
                  attention_mask: Optional[torch.Tensor]) -> LatentStepPlan:
        """The plan of the current forward (hidden_states [batch, seq, d],
        transformers' 4-D mask or None), the same object for every layer."""
        raise NotImplementedError

    def layer_cache(self, layer_idx: int) -> torch.Tensor:
        """Layer layer_idx's paged latent tensor [num_blocks, block_size, R + 2*n_pairs]."""
        raise NotImplementedError

    def as_kwargs(self) -> dict:
        """{argument name: self} for generate() and forward calls, under the
        name the installed transformers expects (`argument_name`, set by the
        cache from the model's forward signature)."""
        return {self.argument_name: self}


def real_tokens(attention_mask: Optional[torch.Tensor], batch: int, seq: int, device,
                first_key: Optional[int] = None) -> torch.Tensor:
    """[batch, seq] bool: the tokens that are not padding. transformers' 4-D
    mask [batch or 1, 1, seq, kv] lets query i see key column first_key + i
    (the query's own token) exactly when token i is not padding. first_key:
    the column of the first new token; by default kv - seq (a mask as wide as
    the tokens seen, a dynamic cache's), 0 for a static cache's prefill (a
    mask max_cache_len wide whose columns start with the prompt)."""
    mask = attention_mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != seq:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    kv = mask.shape[-1]
    first = kv - seq if first_key is None else first_key
    diag = mask[:, 0, torch.arange(seq), torch.arange(first, first + seq)]
    real = diag if diag.dtype == torch.bool else diag == 0
    return real.expand(batch, seq).to(device)


def _cache_argument(kwargs: dict):
    # transformers >= 5.2x passes the cache as `cache`, earlier as `past_key_values`
    return next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None)


class MLAAttention(nn.Module):
    """The attention of one converted layer (weights in the module
    docstring); n_pairs is rope_pairs, the kept rope pairs."""

    def __init__(self, hidden: int, n_h: int, n_kv: int, head_dim: int, latent_dim: int, rope_pairs: int,
                 layer_idx: int, q_bias: bool = False, k_bias: bool = False, v_bias: bool = False,
                 o_bias: bool = False):
        super().__init__()
        self.n_h, self.n_kv, self.head_dim = n_h, n_kv, head_dim
        self.latent_dim, self.rope_pairs, self.layer_idx = latent_dim, rope_pairs, layer_idx
        self.scaling = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(hidden, n_h * head_dim, bias=q_bias)
        self.q_rope_map = nn.Parameter(torch.zeros(n_kv, 2 * rope_pairs, head_dim))
        self.k_rope_proj = nn.Linear(hidden, 2 * rope_pairs, bias=k_bias)
        self.kv_down = nn.Linear(hidden, latent_dim, bias=False)
        self.k_up = nn.Parameter(torch.zeros(n_kv, head_dim, latent_dim))
        self.k_up_bias = nn.Parameter(torch.zeros(n_kv, head_dim)) if k_bias else None
        self.v_up = nn.Linear(latent_dim, n_kv * head_dim, bias=v_bias)
        self.o_proj = nn.Linear(n_h * head_dim, hidden, bias=o_bias)
        self.register_buffer("rope_freq_idx", torch.zeros(1, rope_pairs, dtype=torch.long))
        self.register_buffer("inv_freq", torch.zeros(head_dim // 2, dtype=torch.float32))
        # folded decode projections (mha2mla.decode_projections): mode, rule, and what they were built from
        self.decode_fusion, self.launch_cost_bytes = "auto", decode_projections.LAUNCH_COST_BYTES
        self.decode_fusion_sides = (False, False)  # (input, output) folded weights present
        self._decode_weights_key = None

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 whatever dtype the model is cast to
        # (a bf16 inv_freq would turn long positions by wrong angles); only
        # their device follows the module.
        # A meta tensor (a model built for loading) has no values to keep.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        kept = self.inv_freq if inv_freq.is_meta else inv_freq
        self.inv_freq = kept.float().to(self.inv_freq.device)
        # the folded decode weights were cast with the others, not recomputed
        # from them: rebuild before the next use
        self._decode_weights_key = None
        return self

    # -- folded decode projections (decode_projections.py) --
    def set_decode_fusion(self, mode: str, launch_cost_bytes: int = decode_projections.LAUNCH_COST_BYTES) -> None:
        """Folds this layer's decode projections by `mode` ("auto", "on",
        "off"; decode_projections.fuse_decode_weights) and builds them now."""
        decode_projections.chosen_sides(self, mode, launch_cost_bytes)  # refuses an unknown mode
        self.decode_fusion, self.launch_cost_bytes = mode, launch_cost_bytes
        self._decode_weights_key = None
        self.refresh_decode_weights()

    def refresh_decode_weights(self) -> None:
        """(Re)builds the folded decode weights if the weights, the mode or
        the rule changed since they were built; eager code only."""
        if self.q_proj.weight.is_meta:
            return
        key = (self.decode_fusion, self.launch_cost_bytes, decode_projections.weights_key(self))
        if key == self._decode_weights_key:
            return
        fuse_in, fuse_out = decode_projections.chosen_sides(self, self.decode_fusion, self.launch_cost_bytes)
        with torch.no_grad():
            built = {}
            if fuse_in:
                built["decode_in_weight"], built["decode_in_bias"] = decode_projections.folded_input(self)
            if fuse_out:
                built["decode_out_weight"], built["decode_out_bias"] = decode_projections.folded_output(self)
            for name in decode_projections.BUFFERS:
                self._set_derived_buffer(name, built.get(name))
        self.decode_fusion_sides = (fuse_in, fuse_out)
        self._decode_weights_key = key

    def _set_derived_buffer(self, name: str, value: Optional[torch.Tensor]) -> None:
        # in place where the shape, dtype and device match, so a compiled and
        # graph-captured decode step that reads the buffer stays valid
        old = self._buffers.get(name)
        if value is None:  # an absent bias, or a side not folded (its memory freed)
            self.register_buffer(name, None, persistent=False)
        elif old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
            old.copy_(value)
        else:
            self.register_buffer(name, value, persistent=False)

    def _decode_sides_in_use(self) -> tuple:
        """(input, output) folded weights this decode step uses: none while
        gradients are enabled (they are detached); built here if missing in
        eager code (a traced step uses what the last prefill built)."""
        if torch.is_grad_enabled():
            return False, False
        if self._decode_weights_key is None and not torch.compiler.is_compiling():
            self.refresh_decode_weights()
        if self._decode_weights_key is None:
            return False, False
        return self.decode_fusion_sides

    # -- pieces shared by the full-sequence path and the cached decode path --
    def project_queries(self, x: torch.Tensor):
        """x [..., d] -> q [..., n_h, d_h], unrotated q_rope [..., n_h, 2*n_pairs]."""
        q = self.q_proj(x).unflatten(-1, (self.n_kv, self.n_h // self.n_kv, self.head_dim))
        q_rope = torch.einsum("...gnd,gpd->...gnp", q, self.q_rope_map.to(q.dtype))
        return q.flatten(-3, -2), q_rope.flatten(-3, -2)

    def up_project(self, c: torch.Tensor):
        """latent c [..., R] -> NoPE keys and values [..., n_kv, d_h]."""
        k_nope = torch.einsum("...r,gdr->...gd", c, self.k_up.to(c.dtype))
        if self.k_up_bias is not None:
            k_nope = k_nope + self.k_up_bias.to(c.dtype)
        return k_nope, self.v_up(c).unflatten(-1, (self.n_kv, self.head_dim))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask: Optional[torch.Tensor] = None,
                **kwargs):
        """hidden_states [batch, seq, d] -> ([batch, seq, d], None). Over a
        LatentCache: the step plan's prefill or decode; over any other
        transformers Cache: K/V through cache.update; without one: full
        attention over the given tokens."""
        x = hidden_states
        batch, seq, _ = x.shape
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = kwargs.get("cache_position")
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        positions = positions.expand(batch, seq) if positions.dim() == 1 or positions.shape[0] == 1 else positions
        cache = _cache_argument(kwargs)
        if isinstance(cache, LatentCache):
            return self.attend_over_latent_cache(x, positions, attention_mask, cache), None
        return self.full_attention(x, positions, attention_mask, kv_cache=cache), None

    def full_attention(self, x: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       kv_cache=None):
        """Training/prefill path: K and V up-projected from the latent, SDPA.
        x [batch, seq, d], positions [batch, seq], attention_mask 4-D (or
        None: causal). kv_cache: a transformers Cache that stores the
        up-projected K [batch, n_kv, seq, d_h + 2*n_pairs] and V
        [batch, n_kv, seq, d_h] (what a DynamicCache holds), or None."""
        batch, seq, _ = x.shape
        q, q_rope = self.project_queries(x)
        k_rope = self.k_rope_proj(x).unsqueeze(-2)  # [batch, seq, 1, 2*n_pairs]
        # (positions may be a column slice of generate's: the op wants them contiguous)
        q_rope, k_rope = mla_cuda.partial_rope(q_rope, k_rope, positions.contiguous(), self.rope_freq_idx,
                                               self.inv_freq, validate=False)
        c = self.kv_down(x)
        k_nope, v = self.up_project(c)
        group = self.n_h // self.n_kv
        qf = torch.cat([q, q_rope], dim=-1).transpose(1, 2)
        kf = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_kv, -1)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            kf, v = kv_cache.update(kf, v, self.layer_idx)
        kf = kf.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, :seq, : kf.shape[2]]
        out = F.scaled_dot_product_attention(qf, kf, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                             scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_h * self.head_dim)
        return self.o_proj(out)

    # -- serving over the paged latent cache (docs/method.md, docs/ops.md) --
    def attend_over_latent_cache(self, x: torch.Tensor, positions: torch.Tensor,
                                 attention_mask: Optional[torch.Tensor], cache: LatentCache) -> torch.Tensor:
        """One forward's attention over a LatentCache, by its step plan.
        x [batch, seq, d], positions [batch, seq]."""
        plan = cache.step_plan(self.layer_idx, x, attention_mask)
        latent = cache.layer_cache(self.layer_idx)
        if plan.prefill:
            # before any decode step of this generation; a compiled prefill
            # (transformers compiles a chunked one over a compileable cache)
            # uses what the cache's construction or reset() built
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                self.refresh_decode_weights()
            # No padding: the mask is plain causal, and SDPA's is_causal path
            # (flash) never materialises it, where a [batch, 1, seq, seq]
            # mask grows with the square of the prompt.
            out = self.full_attention(x, positions, None if plan.all_real else attention_mask)
            self.append_to_cache(x.reshape(-1, x.shape[-1]), latent, plan.slots, positions.reshape(-1).contiguous(),
                                 cache.cache_format)
            return out
        if plan.real is not None:
            return self.decode_with_padding(x, positions, latent, plan, cache.cache_format)
        return self.decode(x, positions, latent, plan.slots, plan.block_table, plan.seq_lens, cache.cache_format)

    def decode_with_padding(self, x: torch.Tensor, positions: torch.Tensor, latent_cache: torch.Tensor,
                            plan: LatentStepPlan, cache_format: Optional[str] = None) -> torch.Tensor:
        """A decode step of several tokens per sequence (a prefill chunk after
        the first) where some sequences are still in their left padding
        (plan.real). Those have nothing cached (padding comes first), so their
        real tokens attend only among themselves: the prefill's attention
        over this chunk. The others decode over the cache. Eager: it splits
        the batch by data. x [batch, q_len, d] -> [batch, q_len, d]."""
        batch, q_len, d = x.shape
        padded = ~plan.real.all(1)
        slots = plan.slots.view(batch, q_len)
        out = x.new_empty(batch, q_len, self.o_proj.out_features)
        rows = padded.nonzero().flatten()
        if rows.numel():
            real = plan.real[rows]
            causal = torch.ones(q_len, q_len, dtype=torch.bool, device=x.device).tril()
            # a padding query sees itself too, so its (unused) output stays
            # finite: a NaN there would reach the next layer's values
            mask = (causal & real[:, None, :]) | torch.eye(q_len, dtype=torch.bool, device=x.device)
            out[rows] = self.full_attention(x[rows], positions[rows], mask[:, None])
            self.append_to_cache(x[rows].reshape(-1, d), latent_cache, slots[rows].reshape(-1),
                                 positions[rows].reshape(-1).contiguous(), cache_format)
        rows = (~padded).nonzero().flatten()
        if rows.numel():
            out[rows] = self.decode(x[rows], positions[rows], latent_cache, slots[rows].reshape(-1),
                                    plan.block_table[rows], plan.seq_lens[rows], cache_format)
        return out

    def append_to_cache(self, x: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor,
                        positions: torch.Tensor, cache_format: Optional[str] = None) -> None:
        """Writes the latent and rotated rope key of tokens x [tokens, d] at
        positions [tokens] into this layer's cache at slots [tokens] (a
        negative slot is not written), quantized if cache_format says so."""
        c = self.kv_down(x)
        k_rope = self.k_rope_proj(x).unsqueeze(1)  # [tokens, 1, 2*n_pairs]
        mla_cuda.latent_cache_append(c, k_rope.contiguous(), latent_cache, slots, positions, self.rope_freq_idx,
                                     self.inv_freq, validate=False, cache_format=cache_format)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, cache_format: Optional[str] = None) -> torch.Tensor:
        """New tokens, absorbed attention over the cache. x [batch, d] (one
        token per sequence) or [batch, q_len, d] (q_len tokens each, causal
        among themselves: chunked prefill, speculative decoding), positions
        [batch] or [batch, q_len], slots [batch*q_len]; the tokens are
        appended first (seq_lens count them). Only the latent cache is read:
        no K or V is rebuilt. Projections folded or not by
        decode_projections' rule (the same result to rounding). cache_format:
        the cache's quantized format, or None for a cache in the model dtype."""
        single = x.dim() == 2
        if single:
            x, positions = x[:, None], positions[:, None]
        batch, q_len, _ = x.shape
        tokens = batch * q_len
        flat_x, flat_pos = x.reshape(tokens, -1), positions.reshape(tokens).contiguous()
        fuse_in, fuse_out = self._decode_sides_in_use()
        if fuse_in:
            q_latent, q_rope = self._folded_decode_queries(flat_x, latent_cache, slots, flat_pos, cache_format)
        else:
            q_latent, q_rope = self._decode_queries(flat_x, latent_cache, slots, flat_pos, cache_format)
        # (a no-op at one token per step: the column slices of the folded
        # projection are then contiguous already)
        u = mla_cuda.attention(q_latent.reshape(batch, q_len, self.n_h, -1).contiguous(),
                               q_rope.reshape(batch, q_len, self.n_h, -1).contiguous(),
                               latent_cache, block_table, seq_lens, self.scaling, validate=False,
                               cache_format=cache_format, kv_heads=1)  # [batch, q_len, n_h, R]
        if fuse_out:
            out = F.linear(u.reshape(batch, q_len, -1), self.decode_out_weight, self.decode_out_bias)
        else:
            out = self._decode_output(u)
        return out[:, 0] if single else out

    def _decode_queries(self, x: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor,
                        positions: torch.Tensor, cache_format: Optional[str] = None):
        """Unfolded: appends tokens x [T, d] and returns their absorbed
        queries q_latent [T, n_h, R] and rotated q_rope [T, n_h, 2*n_pairs]."""
        tokens = x.shape[0]
        self.append_to_cache(x, latent_cache, slots, positions, cache_format)
        q, q_rope = self.project_queries(x)  # [T, n_h, d_h], [T, n_h, 2*n_pairs]
        q_rope, _ = mla_cuda.partial_rope(q_rope, q_rope[:, :1], positions, self.rope_freq_idx, self.inv_freq,
                                          validate=False)
        group = self.n_h // self.n_kv
        # q_latent_h = k_up[g]^T q_h, per KV group (no per-head copy of k_up);
        # a k_up_bias adds the same score to every token of a head, which
        # softmax ignores, so decode needs no bias term.
        q_latent = torch.einsum("tgnd,gdr->tgnr", q.view(tokens, self.n_kv, group, self.head_dim),
                                self.k_up.to(q.dtype))
        return q_latent, q_rope

    def _folded_decode_queries(self, x: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor,
                               positions: torch.Tensor, cache_format: Optional[str] = None):
        """Folded: one matmul gives [q_latent | q_rope | c | k_rope] of
        tokens x [T, d]; one in-place RoPE turns the query and key rope
        columns where they lie, the append copies c and the turned key.
        Returns views q_latent [T, n_h*R], q_rope [T, n_h, 2*n_pairs]."""
        tokens = x.shape[0]
        rope, R = 2 * self.rope_pairs, self.latent_dim
        y = F.linear(x, self.decode_in_weight, self.decode_in_bias)
        q_end = self.n_h * R
        rope_end = q_end + self.n_h * rope
        q_rope = y[:, q_end:rope_end].view(tokens, self.n_h, rope)
        k_rope = y[:, rope_end + R:].unsqueeze(1)  # [T, 1, 2*n_pairs]
        mla_cuda.partial_rope_(q_rope, k_rope, positions, self.rope_freq_idx, self.inv_freq, validate=False)
        # column slices: the append reads rows of any stride
        mla_cuda.latent_cache_append(y[:, rope_end:rope_end + R], k_rope, latent_cache, slots, validate=False,
                                     cache_format=cache_format)
        return y[:, :q_end], q_rope

    def _decode_output(self, u: torch.Tensor) -> torch.Tensor:
        """Unfolded: latent attention output u [batch, q_len, n_h, R] ->
        v_up per group, then o_proj: [batch, q_len, d]."""
        batch, q_len = u.shape[:2]
        group = self.n_h // self.n_kv
        w_uv = self.v_up.weight.view(self.n_kv, self.head_dim, self.latent_dim).to(u.dtype)
        out = torch.einsum("bqgnr,gdr->bqgnd", u.view(batch, q_len, self.n_kv, group, -1), w_uv)
        if self.v_up.bias is not None:  # probabilities sum to one: the bias passes through
            out = out + self.v_up.bias.view(self.n_kv, 1, self.head_dim).to(out.dtype)
        return self.o_proj(out.reshape(batch, q_len, -1))


def mla_layers(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def refresh_decode_weights(layers) -> None:
    """Brings the folded decode weights of MLAAttention layers up to date
    (decode_projections); what the latent caches do when made or reset."""
    for attn in layers:
        attn.refresh_decode_weights()


def kv_cache_bytes_per_token(model, dtype_bytes: int = 2) -> dict:
    """Cache bytes per token over all layers: original K/V and the latent
    cache of a converted model (whichever the model is)."""
    cfg = model.config
    n_kv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    original = cfg.num_hidden_layers * 2 * n_kv * head_dim * dtype_bytes
    layers = mla_layers(model)
    if isinstance(layers[0], MLAAttention):
        latent = sum((a.latent_dim + 2 * a.rope_pairs) * dtype_bytes for a in layers)
    else:
        latent = original
    return dict(original=original, converted=latent, ratio=latent / original)


def install_empty_mla(model, block: dict) -> None:
    """Replaces every layer's attention of a freshly built model by an
    uninitialised MLAAttention shaped by an `mla` config block (latent_dims,
    rope_pairs), with the source attention's biases: what a checkpoint's
    weights are loaded into."""
    cfg = model.config
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    for li, layer in enumerate(model.model.layers):
        old = layer.self_attn
        has_bias = lambda name: getattr(getattr(old, name), "bias", None) is not None  # noqa: E731
        layer.self_attn = MLAAttention(cfg.hidden_size, n_h, n_kv, head_dim, block["latent_dims"][li],
                                       block["rope_pairs"], li, q_bias=has_bias("q_proj"), k_bias=has_bias("k_proj"),
                                       v_bias=has_bias("v_proj"), o_bias=has_bias("o_proj"))


# -- native loading: the converted families' own config and model classes --
MODEL_TYPE_PREFIX = "mla_"
# Registered when mha2mla is imported, so from_pretrained finds them in a
# fresh process; other families get their classes when first converted or
# loaded through load_mla_model (mla_classes).
REGISTERED_FAMILIES = ("llama", "qwen2", "mistral")
_FAMILIES: dict = {}


class MLAForCausalLMMixin:
    """The part every converted family's ForCausalLM adds to its source
    class: MLAAttention installed from config.mla, and a save_pretrained
    whose config.json records the sha256 of the weights it wrote (the
    checkpoint format of docs/checkpoint.md, loadable by load_mla_model)."""

    def __init__(self, config, *args, **kwargs):
        block = getattr(config, "mla", None)
        if not isinstance(block, dict) or "latent_dims" not in block:
            raise ValueError(f"{type(config).__name__} has no `mla` block: a converted model's config.json has one "
                             "(convert the model with mha2mla-convert)")
        super().__init__(config, *args, **kwargs)
        install_empty_mla(self, block)

    def save_pretrained(self, save_directory, *args, **kwargs):
        from .checkpoint import WEIGHTS, file_sha256

        block = self.config.mla
        # the recorded sha256 belongs to the file this model was loaded from;
        # it is never written next to other weights
        block.pop("weights_sha256", None)
        block["format_version"] = FORMAT_VERSION
        super().save_pretrained(save_directory, *args, **kwargs)
        weights, cfg_path = os.path.join(save_directory, WEIGHTS), os.path.join(save_directory, "config.json")
        if os.path.isfile(weights) and os.path.isfile(cfg_path):  # one file (not sharded): record its sha256
            block["weights_sha256"] = file_sha256(weights)
            with open(cfg_path) as f:
                saved = json.load(f)
            saved["mla"]["weights_sha256"] = block["weights_sha256"]
            with open(cfg_path, "w") as f:
                f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def mla_classes(source_model_type: str):
    """(config class, ForCausalLM class) of the converted form of a source
    family (model_type "llama" -> "mla_llama"), created and registered with
    AutoConfig and AutoModelForCausalLM on first use."""
    if source_model_type.startswith(MODEL_TYPE_PREFIX):
        source_model_type = source_model_type[len(MODEL_TYPE_PREFIX):]
    if source_model_type in _FAMILIES:
        return _FAMILIES[source_model_type]
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        source_config = CONFIG_MAPPING[source_model_type]
        source_model = MODEL_FOR_CAUSAL_LM_MAPPING[source_config]
    except KeyError:
        raise ValueError(f"transformers has no causal LM of model_type {source_model_type!r}: "
                         "convert a Llama-family model") from None
    model_type = MODEL_TYPE_PREFIX + source_model_type
    config_cls = type("MLA" + source_config.__name__, (source_config,),
                      {"model_type": model_type, "__module__": __name__,
                       "__doc__": f"Config of a {source_model_type} model converted to MLA: the source config "
                                  "plus the `mla` block (docs/checkpoint.md)."})
    model_cls = type("MLA" + source_model.__name__, (MLAForCausalLMMixin, source_model),
                     {"config_class": config_cls, "__module__": __name__,
                      "__doc__": f"A {source_model_type} causal LM whose attention layers are MLAAttention."})
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    globals()[config_cls.__name__] = config_cls  # importable by name (pickle, repr)
    globals()[model_cls.__name__] = model_cls
    _FAMILIES[source_model_type] = (config_cls, model_cls)
    return config_cls, model_cls


def mla_classes_of(model):
    """mla_classes of a source (or converted) model's family, refused for a
    model that is not its family's ForCausalLM."""
    config_cls, model_cls = mla_classes(model.config.model_type)
    source_cls = model_cls.__bases__[-1]
    if not isinstance(model, source_cls):
        raise ValueError(f"{type(model).__name__} is not a {source_cls.__name__}: only a family's own causal LM "
                         "class can be converted")
    return config_cls, model_cls


def as_mla_model(model, block: dict):
    """Makes a model whose attention layers are MLAAttention an instance of
    its family's MLA class (and its config of the MLA config class, with
    `block` as config.mla), in place: what save_pretrained and
    save_mla_model then write is a checkpoint of the current format."""
    config = model.config
    config_cls, model_cls = mla_classes_of(model)
    # The MLA classes only add behaviour (no state) to the source classes, so
    # the objects keep every attribute; every submodule shares the config.
    config.__class__ = config_cls
    config.mla = block
    config.architectures = [model_cls.__name__]
    block["format_version"] = FORMAT_VERSION
    model.__class__ = model_cls
    return model


def _register_families() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # the ops and MLAAttention work without transformers
        return
    for family in REGISTERED_FAMILIES:
        mla_classes(family)


_register_families()
