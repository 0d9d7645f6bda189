"""An orthogonal rotation of the latent space folded into the weights, so
inference pays nothing for it: with c' = H c, kv_down' = H kv_down and
k_up' = k_up H^T, v_up' = v_up H^T leave every score and output unchanged
(H^T H = I). The SVD latent's channels come ordered by singular value, their
variance decaying by orders of magnitude, so one scale per token (a
quantized cache's, mla_cuda.cache_format) fits the first channels and
rounds the last ones to zero; a rotation that mixes all channels gives each
about the mean variance, which a per-token scale quantizes evenly.

Rotations (`kind`):
  "hadamard"  the normalised Walsh-Hadamard matrix for a power-of-two R; for
              R = 2^k * m, m odd, m Hadamard blocks of size 2^k over the
              interleaved channel sets {j, j+m, j+2m, ...}: each block mixes
              channels from the whole spectrum, so every output channel gets
              about the mean variance (a contiguous block-diagonal Hadamard
              would keep the decay from block to block). Deterministic.
  "random"    a seeded random orthogonal matrix (QR of a Gaussian, signs
              fixed): mixes everything for any R.
"""
import torch

from .modeling import mla_layers

KINDS = ("none", "hadamard", "random")


def _walsh_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotation_matrix(kind: str, R: int, seed: int = 0) -> torch.Tensor:
    """[R, R] float64 orthogonal matrix H of the rotation c -> H c."""
    if kind == "hadamard":
        block = R & -R  # the largest power of two dividing R
        m = R // block
        h = torch.zeros(R, R, dtype=torch.float64)
        idx = torch.arange(R).view(block, m)  # column j: channels j, j+m, ...
        hb = _walsh_hadamard(block)
        for j in range(m):
            ch = idx[:, j]
            h[ch[:, None], ch[None, :]] = hb
        return h
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise ValueError(f"latent rotation must be one of {KINDS}, got {kind!r}")


@torch.no_grad()
def rotate_latents(model, kind: str, seed: int = 0) -> dict:
    """Rotates every layer's latent of a converted model in place (float64
    arithmetic, then the weights' dtype) and records it in config.mla as
    latent_rotation; returns that record. Rotating twice composes: the
    record keeps every rotation applied, in order."""
    record = dict(kind=kind, seed=seed if kind == "random" else None)
    if kind == "none":
        return record
    for attn in mla_layers(model):
        h = rotation_matrix(kind, attn.latent_dim, seed)
        dev = attn.kv_down.weight.device
        hd = h.to(dev)
        for w, rotate in ((attn.kv_down.weight, lambda x: hd @ x), (attn.v_up.weight, lambda x: x @ hd.T),
                          (attn.k_up, lambda x: x @ hd.T)):
            w.copy_(rotate(w.double()).to(w.dtype))
    block = getattr(model.config, "mla", None)
    if isinstance(block, dict):
        block["latent_rotation"] = block.get("latent_rotation", []) + [record]
    return record
