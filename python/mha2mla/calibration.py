"""Calibration: real text in, per-layer statistics out.

Two kinds of statistics per layer, from one pass of the source model:
  * the second moment of the attention input x (what k_proj and v_proj see),
    E[x x^T], for activation-aware (whitened) low rank;
  * pre-RoPE queries and keys of a subset of tokens (query pair norms and
    key pair vectors) for choosing which RoPE frequencies to keep.
"""
import random
from dataclasses import dataclass
from typing import List, Sequence

import torch
from tqdm.auto import tqdm

from .corpus import corpus_files, read_window


def sample_sequences(tokenizer, paths: Sequence[str], num_seqs: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[num_seqs, seq_len] token ids cut from random places of random files."""
    files = corpus_files(paths, "calibration")
    rng = random.Random(seed)
    out = []
    tries = 0
    while len(out) < num_seqs:
        tries += 1
        if tries > 20 * num_seqs:
            raise ValueError(f"could not cut {num_seqs} sequences of {seq_len} tokens from {list(paths)}: too little text")
        text = read_window(rng.choice(files), rng, seq_len * 8)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len + 1:
            out.append(ids[1 : seq_len + 1])  # drop a possibly cut first token
    return torch.tensor(out, dtype=torch.long)


@dataclass
class LayerStats:
    input_moment: torch.Tensor  # [d, d] float64: E[x x^T] of the attention input
    n_tokens: int
    q_pair_norms: torch.Tensor  # [N, n_h, d_h/2] float32
    k: torch.Tensor  # [N, n_kv, d_h] float32, pre-RoPE keys (bias included)


@torch.no_grad()
def collect_statistics(model, token_batches: torch.Tensor, batch_size: int = 8, max_rope_tokens: int = 4096,
                       progress: bool = True) -> List[LayerStats]:
    """Runs the source model over token_batches [N, S] and gathers LayerStats
    for every layer."""
    from .source import attention_geometry

    g = attention_geometry(model)
    n_h, n_kv, d_h = g["n_h"], g["n_kv"], g["head_dim"]
    half = d_h // 2
    device = next(model.parameters()).device
    layers = model.model.layers
    moments = [torch.zeros(g["hidden"], g["hidden"], dtype=torch.float64, device=device) for _ in layers]
    counts = [0] * len(layers)
    q_norms = [[] for _ in layers]
    keys = [[] for _ in layers]
    kept = [0] * len(layers)
    hooks = []

    def attn_input_hook(i):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            moments[i] += x.T @ x
            counts[i] += x.shape[0]
        return hook

    def q_hook(i):
        def hook(module, args, out):
            if kept[i] >= max_rope_tokens:
                return
            q = out.reshape(-1, n_h, d_h).float()
            q_norms[i].append(torch.sqrt(q[..., :half] ** 2 + q[..., half:] ** 2)[: max_rope_tokens - kept[i]].cpu())
        return hook

    def k_hook(i):
        def hook(module, args, out):
            if kept[i] >= max_rope_tokens:
                return
            k = out.reshape(-1, n_kv, d_h).float()[: max_rope_tokens - kept[i]]
            keys[i].append(k.cpu())
            kept[i] += k.shape[0]
        return hook

    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hooks.append(attn.k_proj.register_forward_pre_hook(attn_input_hook(i)))
        hooks.append(attn.q_proj.register_forward_hook(q_hook(i)))
        hooks.append(attn.k_proj.register_forward_hook(k_hook(i)))  # after q_hook in call order
    try:
        for start in tqdm(range(0, token_batches.shape[0], batch_size), desc="calibration", disable=not progress):
            model(input_ids=token_batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [
        LayerStats(moments[i].cpu() / max(counts[i], 1), counts[i], torch.cat(q_norms[i]), torch.cat(keys[i]))
        for i in range(len(layers))
    ]
