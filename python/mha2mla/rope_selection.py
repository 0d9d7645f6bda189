"""Which rotary frequencies keep RoPE (docs/method.md), per layer.

A selection is a list of "rope pairs" (frequency i, key component j) and a
per-frequency orthogonal mixing U[i] of the KV heads ([d_h/2, n_kv, n_kv],
rows = components). Component j of frequency i is the 2-D key pair
sum_g U[i][j, g] * (k_g[i], k_g[i + d_h/2]); mixing heads at one frequency
commutes with RoPE (all heads turn by the same angle there), so a kept pair
is rotated exactly and everything else becomes NoPE.

  high/low/uniform/2norm: the paper's strategies; U = identity, so component
      j is KV head j, and each KV head keeps r frequencies of its own.
  2norm-global: U = identity, but the n_kv*r best (frequency, head) pairs
      by the 2-norm score, without a quota per head.
  pca: U from a per-frequency PCA of the keys across KV heads (TransMLA's
      RoRoPE idea), then the n_kv*r best (frequency, component) pairs by the
      2-norm score. The RoPE energy of a frequency concentrates in its first
      components, so the same cache budget keeps more of the positional
      signal.
"""
from dataclasses import dataclass
from typing import List

import torch

STRATEGIES = ("2norm", "high", "low", "uniform", "2norm-global", "pca")


@dataclass
class RopeSelection:
    pairs: List[tuple]  # the kept (frequency, component) pairs, in the cache's rope order
    mixing: torch.Tensor  # [d_h/2, n_kv, n_kv] float64, orthogonal per frequency

    @property
    def freq_idx(self) -> List[int]:
        return [i for i, _ in self.pairs]


def _per_head(freqs_per_head: List[List[int]], half: int, n_kv: int) -> RopeSelection:
    eye = torch.eye(n_kv, dtype=torch.float64).expand(half, n_kv, n_kv).clone()
    return RopeSelection([(i, g) for g in range(n_kv) for i in sorted(freqs_per_head[g])], eye)


def pair_scores(q_pair_norms: torch.Tensor, k: torch.Tensor, mixing: torch.Tensor, group: int) -> torch.Tensor:
    """2-norm score [d_h/2, n_kv] of every (frequency, component):
    mean over tokens of sum over query heads of ||q'^(i)_{h,j}|| * ||k'^(i)_j||,
    where q'_{h,j} = U[i][j, g(h)] q_h (the query's share of component j)."""
    n_tokens, n_kv, d_h = k.shape
    half = d_h // 2
    kp = torch.stack([k[..., :half], k[..., half:]], dim=-1).double()  # [tokens, n_kv, half, 2]
    kmix = torch.einsum("ijg,ngic->njic", mixing, kp)  # [tokens, comp, half, 2]
    k_norm = kmix.norm(dim=-1)  # [tokens, comp, half]
    q = q_pair_norms.double().reshape(n_tokens, n_kv, group, half).sum(2)  # [tokens, n_kv, half] sum over the group's heads
    w = mixing.abs()  # [half, comp, g]
    return torch.einsum("ijg,ngi,nji->ij", w, q, k_norm) / n_tokens


def select_rope(strategy: str, r: int, head_dim: int, n_kv: int, group: int, q_pair_norms=None, k=None) -> RopeSelection:
    half = head_dim // 2
    if not 1 <= r <= half:
        raise ValueError(f"r must be in [1, {half}] (head_dim/2), got {r}")
    if strategy == "high":
        return _per_head([list(range(r))] * n_kv, half, n_kv)
    if strategy == "low":
        return _per_head([list(range(half - r, half))] * n_kv, half, n_kv)
    if strategy == "uniform":
        return _per_head([[k_ * head_dim // (2 * r) for k_ in range(r)]] * n_kv, half, n_kv)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown rope strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if q_pair_norms is None or k is None:
        raise ValueError(f"strategy {strategy!r} needs calibration statistics")
    eye = torch.eye(n_kv, dtype=torch.float64).expand(half, n_kv, n_kv).clone()
    if strategy == "2norm":
        score = pair_scores(q_pair_norms, k, eye, group)  # [half, n_kv]
        return _per_head([score[:, g].topk(r).indices.tolist() for g in range(n_kv)], half, n_kv)
    if strategy == "2norm-global":
        mixing = eye
    else:  # pca: per-frequency principal components of the keys across heads
        kp = torch.stack([k[..., :half], k[..., half:]], dim=-1).double()  # [tokens, n_kv, half, 2]
        cov = torch.einsum("ngic,nhic->igh", kp, kp)  # [half, n_kv, n_kv]
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        mixing = evecs.flip(-1).transpose(1, 2).contiguous()  # rows = components, descending
    score = pair_scores(q_pair_norms, k, mixing, group)
    best = score.flatten().topk(n_kv * r).indices
    pairs = sorted((int(flat) // n_kv, int(flat) % n_kv) for flat in best)
    return RopeSelection(pairs, mixing)
