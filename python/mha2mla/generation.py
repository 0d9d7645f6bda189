"""Generation from the latent KV cache: prefill runs the full-sequence
forward (SDPA over up-projected K/V) and writes each layer's latents into a
PagedLatentCache; every later token runs MLAAttention.decode, which reads only
the latent cache through mla_cuda.attention."""
from typing import List, Sequence

import torch

from mla_cuda import PagedLatentCache

from .modeling import MLAAttention


def new_cache(model, max_tokens: int, block_size: int = 16, dtype=None) -> PagedLatentCache:
    """A cache for max_tokens tokens in total over all sequences."""
    layers = [layer.self_attn for layer in model.model.layers]
    if not all(isinstance(a, MLAAttention) for a in layers):
        raise TypeError("generation from the latent cache needs a converted model (MLAAttention layers)")
    dtype = dtype or next(model.parameters()).dtype
    return PagedLatentCache(len(layers), -(-max_tokens // block_size) + len(layers), block_size,
                            [a.latent_dim for a in layers], 2 * layers[0].rope_pairs, dtype,
                            next(model.parameters()).device)


def _decoder_layer(layer, x, attn_out):
    h = x + attn_out
    return h + layer.mlp(layer.post_attention_layernorm(h))


@torch.no_grad()
def prefill(model, cache: PagedLatentCache, seq_id, ids: torch.Tensor) -> torch.Tensor:
    """Runs prompt ids [S] of one sequence, fills its cache; returns the last logits [vocab]."""
    S = ids.shape[0]
    start = cache.length(seq_id)
    slots = cache.reserve([seq_id], [S])
    positions = torch.arange(start, start + S, device=ids.device)
    x = model.model.embed_tokens(ids[None])
    for li, layer in enumerate(model.model.layers):
        h = layer.input_layernorm(x)
        attn = layer.self_attn
        attn.append_to_cache(h[0], cache.layers[li], slots, positions)
        out, _ = attn(h, position_ids=positions[None])
        x = _decoder_layer(layer, x, out)
    return model.lm_head(model.model.norm(x))[0, -1]


@torch.no_grad()
def decode_step(model, cache: PagedLatentCache, seq_ids: Sequence, tokens: torch.Tensor) -> torch.Tensor:
    """One token per sequence (tokens [B]); returns logits [B, vocab]."""
    positions = torch.tensor([cache.length(s) for s in seq_ids], device=tokens.device)
    slots = cache.reserve(list(seq_ids), [1] * len(seq_ids))
    table, lens = cache.block_table(seq_ids), cache.seq_lens(seq_ids)
    x = model.model.embed_tokens(tokens)
    for li, layer in enumerate(model.model.layers):
        out = layer.self_attn.decode(layer.input_layernorm(x), positions, cache.layers[li], slots, table, lens)
        x = _decoder_layer(layer, x, out)
    return model.lm_head(model.model.norm(x))


@torch.no_grad()
def generate_greedy(model, prompts: List[torch.Tensor], max_new_tokens: int, block_size: int = 16) -> List[List[int]]:
    """Greedy continuation of each prompt (1-D id tensors of any lengths),
    batched over sequences after their prefill. Returns the new tokens."""
    total = sum(p.numel() for p in prompts) + len(prompts) * max_new_tokens
    cache = new_cache(model, total, block_size)
    ids = list(range(len(prompts)))
    nxt = torch.stack([prefill(model, cache, i, p).argmax() for i, p in zip(ids, prompts)])
    out = [[int(t)] for t in nxt]
    for _ in range(max_new_tokens - 1):
        nxt = decode_step(model, cache, ids, nxt).argmax(-1)
        for o, t in zip(out, nxt.tolist()):
            o.append(t)
    return out
