"""Absorbed decode projections (DeepSeek's inference absorption): per layer,
the decode step's input projections folded into one matmul and its output
projections into another, derived from MLAAttention's weights.

Input, one weight [n_h*R + n_h*2B + R + 2B, d] (B = rope pairs, R = latent):
  rows of head h (group g):  k_up[g]^T W_q[h]        -> q_latent_h  [R]
                             q_rope_map[g] W_q[h]    -> q_rope_h    [2B], unrotated
  then                       kv_down                 -> c           [R]
                             k_rope_proj             -> k_rope      [2B], unrotated
  A q_proj bias folds through the same products into the fused bias; a
  k_up_bias adds one constant to every score of a head, which softmax
  ignores, so it has no term.
Output, one weight [d, n_h*R]: columns of head h are W_o[:, h] v_up[g], the
value up-projection folded into o_proj; v_up's bias passes through the
attention (its probabilities sum to one) into the output bias
b_o + W_o (v_up bias of each head's group).

When it pays. At small batch a decode step reads every weight once and runs
a few dozen small kernels per layer, so its time is about
weight bytes / bandwidth + kernels x launch cost. Folding removes kernels
(input: 5 matmuls and an out-of-place RoPE of 3 kernels become 1 matmul and
an in-place RoPE; output: 2 matmuls become 1) but the folded weights can be
much wider: q_latent is n_h*R rows where q_proj has n_h*d_h. A side is fused
when its folded weight costs no more bytes than the unfused ones plus
LAUNCH_COST_BYTES per kernel it saves. SmolLM2-135M at d_kv=32 (folded input
1200 x 576 against 736 x 576 of unfused weights): both sides fused;
Llama-2-7B at d_kv=64 (folded input 84480 x 4096 against about 9200 x
4096): neither. `fuse_decode_weights(model, mode)` overrides the rule:
"on" fuses both sides, "off" neither.

The folded weights are derived data, never a checkpoint's: they are
non-persistent buffers (so state_dict, save_pretrained and save_mla_model
never see them, .to() moves them, and a CUDA graph treats them as static
inputs), built in the weights' own dtype and device from products computed
in at least float32. They are never stale: the latent caches bring them up
to date when made and reset, and MLAAttention at every eager prefill over a
latent cache (before generate() runs a compiled decode step); each rebuilds
them when the weights' identity, storage or version counter changed since
the last build (training and load_state_dict bump the version; .to()
invalidates them through MLAAttention._apply). A rebuild of
the same shape copies in place, so a compiled, graph-captured step stays
valid. Decode uses the unfused path while gradients are enabled (the folded
weights are detached) and in a traced step that finds them missing.
"""
from typing import List, Optional, Tuple

import torch

FUSION_MODES = ("auto", "on", "off")
# Bytes a decode step could read in the time one more small kernel costs it:
# ~2.5 us of a graph-replayed kernel at ~3.4 TB/s (an H200's achieved HBM
# bandwidth).
LAUNCH_COST_BYTES = 8 << 20
# Kernels each side's folding saves per layer and step (see above).
INPUT_LAUNCHES_SAVED = 6
OUTPUT_LAUNCHES_SAVED = 1

BUFFERS = ("decode_in_weight", "decode_in_bias", "decode_out_weight", "decode_out_bias")


def _numel(*tensors) -> int:
    return sum(t.numel() for t in tensors if t is not None)


def projection_bytes(attn) -> dict:
    """{"input" | "output": (unfused bytes, folded bytes, kernels saved)} of
    one MLAAttention's decode projections, weights and biases."""
    size = attn.q_proj.weight.element_size()
    d, n_h, R, rope = attn.q_proj.in_features, attn.n_h, attn.latent_dim, 2 * attn.rope_pairs
    unfused_in = _numel(attn.q_proj.weight, attn.q_proj.bias, attn.q_rope_map, attn.k_up, attn.kv_down.weight,
                        attn.k_rope_proj.weight, attn.k_rope_proj.bias)
    rows = n_h * (R + rope) + R + rope
    has_in_bias = attn.q_proj.bias is not None or attn.k_rope_proj.bias is not None
    fused_in = rows * d + (rows if has_in_bias else 0)
    unfused_out = _numel(attn.v_up.weight, attn.v_up.bias, attn.o_proj.weight, attn.o_proj.bias)
    has_out_bias = attn.v_up.bias is not None or attn.o_proj.bias is not None
    fused_out = d * n_h * R + (d if has_out_bias else 0)
    out_saved = OUTPUT_LAUNCHES_SAVED + (attn.v_up.bias is not None)  # the bias add after the value matmul
    return {"input": (unfused_in * size, fused_in * size, INPUT_LAUNCHES_SAVED),
            "output": (unfused_out * size, fused_out * size, out_saved)}


def chosen_sides(attn, mode: str = "auto", launch_cost_bytes: int = LAUNCH_COST_BYTES) -> Tuple[bool, bool]:
    """(fuse the input projections, fuse the output projection) of one layer
    under `mode` ("auto": the rule in the module docstring)."""
    if mode not in FUSION_MODES:
        raise ValueError(f"decode fusion mode must be one of {FUSION_MODES}, got {mode!r}")
    if mode != "auto":
        return (mode == "on",) * 2
    costs = projection_bytes(attn)
    pays = lambda side: costs[side][1] <= costs[side][0] + costs[side][2] * launch_cost_bytes  # noqa: E731
    return pays("input"), pays("output")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def folded_input(attn) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The fused input projection: weight [n_h*R + n_h*2B + R + 2B, d] and
    bias (None when q_proj and k_rope_proj have none), output columns
    [q_latent of every head | unrotated q_rope of every head | c | k_rope]."""
    w_q = attn.q_proj.weight
    dtype, work = w_q.dtype, _work_dtype(w_q.dtype)
    n_kv, group, d_h = attn.n_kv, attn.n_h // attn.n_kv, attn.head_dim
    wq = w_q.to(work).view(n_kv, group, d_h, -1)
    k_up, rope_map = attn.k_up.to(work), attn.q_rope_map.to(work)
    w_latent = torch.einsum("gdr,gnde->gnre", k_up, wq).flatten(0, 2)
    w_rope = torch.einsum("gpd,gnde->gnpe", rope_map, wq).flatten(0, 2)
    weight = torch.cat([w_latent, w_rope, attn.kv_down.weight.to(work), attn.k_rope_proj.weight.to(work)])
    bias = None
    if attn.q_proj.bias is not None or attn.k_rope_proj.bias is not None:
        parts = [torch.zeros(w_latent.shape[0] + w_rope.shape[0], dtype=work, device=w_q.device)]
        if attn.q_proj.bias is not None:
            bq = attn.q_proj.bias.to(work).view(n_kv, group, d_h)
            parts = [torch.einsum("gdr,gnd->gnr", k_up, bq).flatten(), torch.einsum("gpd,gnd->gnp", rope_map, bq).flatten()]
        parts.append(torch.zeros(attn.latent_dim, dtype=work, device=w_q.device))
        k_bias = attn.k_rope_proj.bias
        parts.append(k_bias.to(work) if k_bias is not None else torch.zeros(2 * attn.rope_pairs, dtype=work,
                                                                               device=w_q.device))
        bias = torch.cat(parts).to(dtype)
    return weight.to(dtype), bias


def folded_output(attn) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The fused output projection: weight [d, n_h*R] mapping attention's
    latent output u [n_h*R] (head-major) to the layer output, and bias (None
    when v_up and o_proj have none)."""
    w_o = attn.o_proj.weight
    dtype, work = w_o.dtype, _work_dtype(w_o.dtype)
    n_kv, group, d_h = attn.n_kv, attn.n_h // attn.n_kv, attn.head_dim
    wo = w_o.to(work).view(-1, n_kv, group, d_h)
    w_uv = attn.v_up.weight.to(work).view(n_kv, d_h, attn.latent_dim)
    weight = torch.einsum("egnd,gdr->egnr", wo, w_uv).flatten(1)
    bias = None
    if attn.v_up.bias is not None or attn.o_proj.bias is not None:
        bias = torch.zeros(w_o.shape[0], dtype=work, device=w_o.device)
        if attn.o_proj.bias is not None:
            bias = bias + attn.o_proj.bias.to(work)
        if attn.v_up.bias is not None:  # each head's value bias is its group's
            per_head = attn.v_up.bias.to(work).view(n_kv, 1, d_h).expand(n_kv, group, d_h).flatten()
            bias = bias + w_o.to(work) @ per_head
        bias = bias.to(dtype)
    return weight.to(dtype), bias


def source_tensors(attn) -> List[torch.Tensor]:
    """The weights the folded ones are derived from."""
    return [t for t in (attn.q_proj.weight, attn.q_proj.bias, attn.q_rope_map, attn.k_up, attn.kv_down.weight,
                        attn.k_rope_proj.weight, attn.k_rope_proj.bias, attn.v_up.weight, attn.v_up.bias,
                        attn.o_proj.weight, attn.o_proj.bias) if t is not None]


def weights_key(attn) -> tuple:
    """What the folded weights were built from: each source tensor's
    identity, storage and version counter (an in-place update bumps it)."""
    return tuple((id(t), t.data_ptr(), t._version) for t in source_tensors(attn))


def fuse_decode_weights(model, mode: str = "auto", launch_cost_bytes: int = LAUNCH_COST_BYTES) -> List[tuple]:
    """Sets every MLAAttention layer of `model` to fold its decode
    projections by `mode` ("auto": fold a side where it pays, by the rule in
    this module's docstring; "on": always; "off": never, freeing the folded
    weights) and builds them now. Returns each layer's (input fused, output
    fused). The latent caches rebuild stale folded weights at every prefill
    on their own; call this to change the mode or the rule's launch cost."""
    from .modeling import MLAAttention

    sides = []
    for module in model.modules():
        if isinstance(module, MLAAttention):
            module.set_decode_fusion(mode, launch_cost_bytes)
            sides.append(module.decode_fusion_sides)
    if not sides:
        raise TypeError("fuse_decode_weights needs a converted model (MLAAttention layers); convert it with "
                        "mha2mla-convert (python/convert.py) first")
    return sides
