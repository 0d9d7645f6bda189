"""MLAAttention: the attention module of converted models, a drop-in for a
transformers Llama-family `self_attn`.

Per layer (shapes [out, in]):
  q_proj       [n_h*d_h, d]      the source model's, unchanged
  q_rope_map   [n_kv, 2B, d_h]   per KV group: the query's share of each kept
                                 rope pair (B pairs, r first halves then r
                                 second halves, the mla_cuda layout)
  k_rope_proj  [2B, d]           rope keys, one set shared by all heads
  kv_down      [R, d]            latent c = kv_down x: what is cached
  k_up         [n_kv, d_h, R]    NoPE key of group g: k_up[g] c (+ k_up_bias)
  v_up         [n_kv*d_h, R]     values (+ bias)
  o_proj       [d, n_h*d_h]      unchanged
Score of head h (group g) against token t:
  (q_h . k_up[g] c_t + rot(q_rope_map[g] q_h) . rot(k_rope_t)) / sqrt(d_h).
The cache row of a token is [c (R) | rotated k_rope (2B)]: a latent shared
by all heads plus one shared rope key, the DeepSeek layout with any R and B.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mla_cuda


class MLAAttention(nn.Module):
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

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 whatever dtype the model is cast to
        # (a bf16 inv_freq would turn long positions by wrong angles); only
        # their device follows the module.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.float().to(self.rope_freq_idx.device)
        return self

    # -- pieces shared by the full-sequence path and the cached decode path --
    def project_queries(self, x: torch.Tensor):
        """x [..., d] -> q [..., n_h, d_h], unrotated q_rope [..., n_h, 2B]."""
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
        x = hidden_states
        batch, seq, _ = x.shape
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = kwargs.get("cache_position")
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        positions = positions.expand(batch, seq) if positions.dim() == 1 or positions.shape[0] == 1 else positions
        # transformers >= 5.2x passes the cache as `cache`, earlier as `past_key_values`
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None)
        if cache is not None and hasattr(cache, "mla_attend"):  # LatentKVCache: generate() over the latent cache
            return cache.mla_attend(self, x, positions, attention_mask), None
        return self.full_attention(x, positions, attention_mask), None

    def full_attention(self, x: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """Training/prefill path: K and V up-projected from the latent, SDPA.
        x [b, s, d], positions [b, s], attention_mask 4-D (or None: causal)."""
        batch, seq, _ = x.shape
        q, q_rope = self.project_queries(x)
        k_rope = self.k_rope_proj(x).unsqueeze(-2)  # [b, s, 1, 2B]
        q_rope, k_rope = mla_cuda.partial_rope(q_rope, k_rope, positions, self.rope_freq_idx, self.inv_freq,
                                               validate=False)
        c = self.kv_down(x)
        k_nope, v = self.up_project(c)
        group = self.n_h // self.n_kv
        qf = torch.cat([q, q_rope], dim=-1).transpose(1, 2)
        kf = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_kv, -1)], dim=-1).transpose(1, 2)
        kf = kf.repeat_interleave(group, dim=1)
        v = v.transpose(1, 2).repeat_interleave(group, dim=1)
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, :seq, : kf.shape[2]]
        out = F.scaled_dot_product_attention(qf, kf, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                             scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_h * self.head_dim)
        return self.o_proj(out)


    # -- serving over the paged latent cache (MHA2MLA.md 1.4) ---------------
    def append_to_cache(self, x: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor,
                        positions: torch.Tensor) -> None:
        """Writes the latent and rotated rope key of tokens x [T, d] at
        positions [T] into this layer's cache at slots [T]."""
        c = self.kv_down(x)
        k_rope = self.k_rope_proj(x).unsqueeze(1)  # [T, 1, 2B]
        mla_cuda.latent_cache_append(c, k_rope.contiguous(), latent_cache, slots, positions, self.rope_freq_idx,
                                     self.inv_freq, validate=False)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """New tokens, absorbed attention over the cache. x [B, d] (one token
        per sequence) or [B, Q, d] (Q tokens each, causal among themselves:
        chunked prefill, speculative decoding), positions [B] or [B, Q], slots
        [B*Q]; the tokens are appended first (seq_lens count them). Only the
        latent cache is read: no K or V is rebuilt."""
        single = x.dim() == 2
        if single:
            x, positions = x[:, None], positions[:, None]
        B, Q, _ = x.shape
        flat_x, flat_pos = x.reshape(B * Q, -1), positions.reshape(B * Q).contiguous()
        self.append_to_cache(flat_x, latent_cache, slots, flat_pos)
        q, q_rope = self.project_queries(flat_x)  # [BQ, n_h, d_h], [BQ, n_h, 2B]
        q_rope, _ = mla_cuda.partial_rope(q_rope, q_rope[:, :1], flat_pos, self.rope_freq_idx, self.inv_freq,
                                          validate=False)
        group = self.n_h // self.n_kv
        # q_latent_h = k_up[g]^T q_h, per KV group (no per-head copy of k_up);
        # a k_up_bias adds the same score to every token of a head, which
        # softmax ignores, so decode needs no bias term.
        q_latent = torch.einsum("tgnd,gdr->tgnr", q.view(B * Q, self.n_kv, group, self.head_dim),
                                self.k_up.to(q.dtype))
        u = mla_cuda.attention(q_latent.reshape(B, Q, self.n_h, -1).contiguous(), q_rope.reshape(B, Q, self.n_h, -1).contiguous(),
                               latent_cache, block_table, seq_lens, self.scaling, validate=False)  # [B, Q, n_h, R]
        w_uv = self.v_up.weight.view(self.n_kv, self.head_dim, self.latent_dim).to(u.dtype)
        out = torch.einsum("bqgnr,gdr->bqgnd", u.view(B, Q, self.n_kv, group, -1), w_uv)
        if self.v_up.bias is not None:  # probabilities sum to one: the bias passes through
            out = out + self.v_up.bias.view(self.n_kv, 1, self.head_dim).to(out.dtype)
        out = self.o_proj(out.reshape(B, Q, -1))
        return out[:, 0] if single else out


def mla_layers(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


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
