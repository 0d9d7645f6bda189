"""Converts a loaded Llama-family model to MLA in place (docs/method.md):
rope selection, low-rank factorisation of [W_k_nope; W_v], and the MLAAttention
modules of modeling.py. Loading a checkpoint needs none of this module."""
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from .calibration import LayerStats
from .latent_rotation import KINDS as ROTATIONS
from .latent_rotation import rotate_latents
from .lowrank import S_PLACEMENTS, SVD_METHODS, allocate_ranks, factor_kv, spectrum, whitening_factor
from .modeling import FORMAT_VERSION, MLAAttention, as_mla_model, mla_classes_of
from .rope_selection import STRATEGIES, RopeSelection, select_rope
from .source import attention_geometry


@dataclass
class ConversionOptions:
    rope_strategy: str = "2norm"
    r: Optional[int] = None  # rope frequencies per KV head; default d_h/16
    d_kv: Optional[int] = None  # latent per KV head; default d_h/2; 0 = no truncation
    svd: str = "joint"
    s_placement: str = "sqrt"
    whiten: bool = True  # activation-aware SVD (needs calibration)
    rank_allocation: str = "uniform"  # or "energy": per-layer ranks, same total
    calibration: dict = field(default_factory=dict)  # recorded in the checkpoint
    latent_rotation: str = "none"  # "hadamard" or "random": folded into kv_down / k_up / v_up (latent_rotation.py)
    rotation_seed: int = 0  # of "random"

    def resolved(self, head_dim: int) -> "ConversionOptions":
        o = ConversionOptions(**asdict(self))
        o.r = o.r if o.r is not None else max(1, head_dim // 16)
        o.d_kv = o.d_kv if o.d_kv is not None else head_dim // 2
        if o.rope_strategy not in STRATEGIES:
            raise ValueError(f"rope strategy must be one of {STRATEGIES}, got {o.rope_strategy!r}")
        if o.svd not in SVD_METHODS or o.s_placement not in S_PLACEMENTS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, s_placement one of {S_PLACEMENTS}")
        if o.rank_allocation not in ("uniform", "energy"):
            raise ValueError("rank_allocation must be 'uniform' or 'energy'")
        if not 1 <= o.r <= head_dim // 2:
            raise ValueError(f"r must be in [1, {head_dim // 2}], got {o.r}")
        if o.latent_rotation not in ROTATIONS:
            raise ValueError(f"latent_rotation must be one of {ROTATIONS}, got {o.latent_rotation!r}")
        if o.d_kv < 0:
            raise ValueError("d_kv must be >= 0 (0 = no truncation)")
        return o

    @property
    def needs_calibration(self) -> bool:
        return self.whiten or self.rope_strategy in ("2norm", "2norm-global", "pca")


def rope_maps(sel: RopeSelection, n_kv: int, head_dim: int):
    """Projections of a rope selection (float64), n_pairs = kept pairs:
    key_rope [2*n_pairs, n_kv*d_h], query_rope [n_kv, 2*n_pairs, d_h] and
    key_nope [n_nope, n_kv*d_h], query_nope [n_kv, n_nope, d_h] (everything
    else)."""
    half = head_dim // 2
    U = sel.mixing  # [half, comp, g]
    kept = set(sel.pairs)
    n_pairs = len(sel.pairs)
    key_rope = torch.zeros(2 * n_pairs, n_kv, head_dim, dtype=torch.float64)
    query_rope = torch.zeros(n_kv, 2 * n_pairs, head_dim, dtype=torch.float64)
    for p, (i, j) in enumerate(sel.pairs):
        for c in (0, 1):
            key_rope[p + c * n_pairs, :, i + c * half] = U[i, j]
            query_rope[:, p + c * n_pairs, i + c * half] = U[i, j]
    nope = [(i, j, c) for i in range(half) for j in range(n_kv) if (i, j) not in kept for c in (0, 1)]
    key_nope = torch.zeros(len(nope), n_kv, head_dim, dtype=torch.float64)
    query_nope = torch.zeros(n_kv, len(nope), head_dim, dtype=torch.float64)
    for n, (i, j, c) in enumerate(nope):
        key_nope[n, :, i + c * half] = U[i, j]
        query_nope[:, n, i + c * half] = U[i, j]
    return key_rope.flatten(1), query_rope, key_nope.flatten(1), query_nope


@torch.no_grad()
def convert_model(model, stats: Optional[List[LayerStats]], options: ConversionOptions, progress: bool = True) -> dict:
    """Replaces every layer's attention by MLAAttention and makes the model
    its family's MLA class (modeling.as_mla_model); returns the `mla` config
    block describing the conversion."""
    g = attention_geometry(model)
    n_h, n_kv, d_h, d = g["n_h"], g["n_kv"], g["head_dim"], g["hidden"]
    opts = options.resolved(d_h)
    mla_classes_of(model)  # a family without an MLA class is refused before any work
    if opts.needs_calibration and stats is None:
        raise ValueError("this conversion needs calibration statistics (2-norm rope selection or whitening)")
    layers = model.model.layers
    inv_freq = model.model.rotary_emb.inv_freq.detach().float().cpu()
    full_rank = 2 * n_kv * d_h  # no truncation
    R = full_rank if opts.d_kv == 0 else n_kv * opts.d_kv

    # pass 1: rope selection and the matrices to factor, per layer
    plans = []
    for li, layer in enumerate(tqdm(layers, desc="rope selection", disable=not progress)):
        attn = layer.self_attn
        st = stats[li] if stats is not None else None
        sel = select_rope(opts.rope_strategy, opts.r, d_h, n_kv, n_h // n_kv,
                          st.q_pair_norms if st else None, st.k if st else None)
        k_rope_map, q_rope_map, k_nope_map, q_nope_map = rope_maps(sel, n_kv, d_h)
        w_k = attn.k_proj.weight.double().cpu()
        w_knope = k_nope_map @ w_k
        whiten = whitening_factor(st.input_moment) if opts.whiten else None
        plans.append(dict(sel=sel, k_rope_map=k_rope_map, q_rope_map=q_rope_map, q_nope_map=q_nope_map,
                          k_nope_map=k_nope_map, w_knope=w_knope, w_v=attn.v_proj.weight.double().cpu(), whiten=whiten))

    # per-layer ranks (same total cache)
    if opts.rank_allocation == "energy" and opts.d_kv != 0:
        spectra = [spectrum(torch.cat([p["w_knope"], p["w_v"]]), p["whiten"]) for p in plans]
        ranks = allocate_ranks(spectra, R * len(layers), granularity=max(1, n_kv), minimum=max(n_kv, R // 2))
    else:
        ranks = [R] * len(layers)

    # pass 2: factor and install the new modules
    for li, layer in enumerate(tqdm(layers, desc="low-rank kv", disable=not progress)):
        attn, p = layer.self_attn, plans[li]
        dev, dt = attn.q_proj.weight.device, attn.q_proj.weight.dtype
        k_up_rows, v_up, down = factor_kv(p["w_knope"], p["w_v"], ranks[li], opts.svd, p["whiten"], opts.s_placement)
        n_pairs = len(p["sel"].pairs)
        bias = lambda m: getattr(m, "bias", None) is not None  # noqa: E731
        new = MLAAttention(d, n_h, n_kv, d_h, ranks[li], n_pairs, li, q_bias=bias(attn.q_proj), k_bias=bias(attn.k_proj),
                           v_bias=bias(attn.v_proj), o_bias=bias(attn.o_proj))
        new.q_proj.load_state_dict(attn.q_proj.state_dict())
        new.o_proj.load_state_dict(attn.o_proj.state_dict())
        new.q_rope_map.copy_(p["q_rope_map"])
        new.k_rope_proj.weight.copy_(p["k_rope_map"] @ attn.k_proj.weight.double().cpu())
        new.kv_down.weight.copy_(down)
        # NoPE key of group g in its head's own coordinates: query_nope[g]^T k'_nope
        new.k_up.copy_(torch.einsum("gnd,nr->gdr", p["q_nope_map"], k_up_rows))
        if bias(attn.k_proj):
            b_k = attn.k_proj.bias.double().cpu()
            new.k_rope_proj.bias.copy_(p["k_rope_map"] @ b_k)
            new.k_up_bias.copy_(torch.einsum("gnd,n->gd", p["q_nope_map"], p["k_nope_map"] @ b_k))
        new.v_up.weight.copy_(v_up)
        if bias(attn.v_proj):
            new.v_up.bias.copy_(attn.v_proj.bias)
        new.rope_freq_idx.copy_(torch.tensor([p["sel"].freq_idx]))
        new.inv_freq.copy_(inv_freq)
        layer.self_attn = new.to(device=dev, dtype=dt)
        del attn

    per_head = None
    if opts.rope_strategy not in ("pca",):
        per_head = [[[i for i, j in p["sel"].pairs if j == g] for g in range(n_kv)] for p in plans]
    block = dict(
        format_version=FORMAT_VERSION,
        rope_strategy=opts.rope_strategy,
        r=opts.r,
        rope_pairs=n_kv * opts.r,
        rope_freq_idx=[p["sel"].freq_idx for p in plans],
        rope_components=[[j for _, j in p["sel"].pairs] for p in plans],
        frequencies_per_kv_head=per_head,
        d_kv=opts.d_kv,
        latent_dims=ranks,
        svd=opts.svd,
        s_placement=opts.s_placement,
        whiten=opts.whiten,
        rank_allocation=opts.rank_allocation,
        calibration=opts.calibration,
    )
    as_mla_model(model, block)
    rotate_latents(model, opts.latent_rotation, opts.rotation_seed)
    if opts.latent_rotation == "none":
        block["latent_rotation"] = []
    return block

