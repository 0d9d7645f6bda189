"""Low-rank joint KV (docs/method.md), optionally activation-aware.

The NoPE key rows and the value rows of a layer are factored as
M ~= up @ down with down [R, d] (the latent c = down x is what is cached)
and up [rows, R]. Plain SVD minimises ||M - M'||_F; whitened SVD minimises
||(M - M') X|| for the calibration inputs X (second moment C = E[x x^T]):
SVD of M L with C = L L^T, then down = S^a V^T L^-1 (the CARE / SVD-LLM /
Palu family), which is what keeps a one-shot conversion usable.
"""
from typing import List, Optional, Tuple

import torch

SVD_METHODS = ("joint", "split")
S_PLACEMENTS = ("sqrt", "up")


def max_latent_per_kv_head(hidden: int, n_kv: int, head_dim: int, r: int) -> int:
    """The largest useful d_kv: the rank [W_k_nope; W_v] can have, per KV
    head. That matrix has n_kv (head_dim - 2r) NoPE key rows plus n_kv
    head_dim value rows, and `hidden` columns; a wider latent only adds
    zero columns."""
    return min(hidden, n_kv * (2 * head_dim - 2 * r)) // n_kv


def whitening_factor(moment: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + damp*mean(diag C)*I (float64)."""
    c = moment.double()
    c = c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    return torch.linalg.cholesky(c)


def spectrum(m: torch.Tensor, whiten: Optional[torch.Tensor]) -> torch.Tensor:
    """Singular values of M (or M L when whitened), float64."""
    a = m.double() @ whiten if whiten is not None else m.double()
    return torch.linalg.svdvals(a)


def factor(m: torch.Tensor, rank: int, whiten: Optional[torch.Tensor], s_placement: str = "sqrt") -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (up [rows, rank], down [rank, d]) float64 with up @ down ~= M."""
    if s_placement not in S_PLACEMENTS:
        raise ValueError(f"s_placement must be one of {S_PLACEMENTS}")
    a = m.double() @ whiten if whiten is not None else m.double()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    rank = min(rank, s.shape[0])
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if whiten is not None:  # vh L^-1, via a triangular solve: (L^T X^T = vh^T)
        vh = torch.linalg.solve_triangular(whiten.T, vh.T, upper=True).T
    if s_placement == "sqrt":
        root = s.sqrt()
        return u * root, root[:, None] * vh
    return u * s, vh


def factor_kv(w_knope: torch.Tensor, w_v: torch.Tensor, rank: int, method: str, whiten: Optional[torch.Tensor],
              s_placement: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors the NoPE key rows and the value rows into one latent of width
    `rank`. Returns (k_up [rows_k, rank], v_up [rows_v, rank], down [rank, d])."""
    if method == "joint":
        up, down = factor(torch.cat([w_knope, w_v]), rank, whiten, s_placement)
        up = _pad_cols(up, rank)
        return up[: w_knope.shape[0]], up[w_knope.shape[0] :], _pad_rows(down, rank)
    if method == "split":
        rk = rank // 2
        rv = rank - rk
        up_k, down_k = factor(w_knope, rk, whiten, s_placement) if w_knope.shape[0] else (w_knope.new_zeros(0, 0), w_knope.new_zeros(0, w_v.shape[1]))
        up_v, down_v = factor(w_v, rv, whiten, s_placement)
        up_k, down_k = _pad_cols(up_k.double(), rk), _pad_rows(down_k.double(), rk)
        up_v, down_v = _pad_cols(up_v, rv), _pad_rows(down_v, rv)
        k_up = torch.cat([up_k, up_k.new_zeros(up_k.shape[0], rv)], dim=1)
        v_up = torch.cat([up_v.new_zeros(up_v.shape[0], rk), up_v], dim=1)
        return k_up, v_up, torch.cat([down_k, down_v])
    raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")


def _pad_cols(x: torch.Tensor, n: int) -> torch.Tensor:
    """A rank the matrix does not have is padded with zeros (exact, unused)."""
    return torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1])], dim=1) if x.shape[1] < n else x


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(n - x.shape[0], x.shape[1])]) if x.shape[0] < n else x


def allocate_ranks(spectra: List[torch.Tensor], total: int, granularity: int, minimum: int) -> List[int]:
    """Per-layer ranks summing to `total` (in steps of `granularity`, at least
    `minimum` each) that keep the most squared singular value: greedy on the
    energy of the next `granularity` values of each layer. With whitened
    spectra this is the output error of k/v over the calibration inputs."""
    n = len(spectra)
    ranks = [minimum] * n
    left = total - minimum * n
    if left < 0:
        raise ValueError("rank budget below the per-layer minimum")
    energy = [s.double() ** 2 for s in spectra]

    def gain(i):
        return float(energy[i][ranks[i] : ranks[i] + granularity].sum())

    while left >= granularity:
        best = max(range(n), key=gain)
        if gain(best) <= 0:
            break
        ranks[best] += granularity
        left -= granularity
    i = 0
    while left > 0:  # whatever does not fit the granularity, round-robin
        ranks[i % n] += 1
        left -= 1
        i += 1
    return ranks
