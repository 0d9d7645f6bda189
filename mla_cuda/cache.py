"""PagedLatentCache: the latent KV cache of a whole model, in fixed-size
blocks that sequences take on demand and give back when they finish."""
from typing import Dict, List, Optional, Sequence

import torch

from .cache_format import is_quantized, quantized_row_layout


class PagedLatentCache:
    """One cache tensor per layer, [num_blocks, block_size, R + n_kv*2r],
    plus the block bookkeeping shared by all layers. With a quantized
    cache_format ("fp8", "int4", "<kind>-g<N>": mla_cuda.cache_format) the
    layers are uint8 [num_blocks, block_size, row_bytes] and `dtype` is the
    dtype of the rope keys (the model's); pass `cache_format` to
    latent_cache_append and attention.

    A sequence is a hashable id. `reserve(ids, counts)` makes room for new
    tokens and returns their flat slots (for latent_cache_append); after
    that, `block_table(ids)` and `seq_lens(ids)` describe the sequences to
    mla_cuda.attention. `free(id)` returns a finished sequence's blocks.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        latent_dim,
        rope_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device="cpu",
        cache_format: Optional[str] = None,
    ):
        """latent_dim: R, or a list of R per layer (per-layer rank allocation);
        rope_dim: n_kv*2r, the rope values of a row."""
        dims = list(latent_dim) if isinstance(latent_dim, (list, tuple)) else [latent_dim] * num_layers
        if len(dims) != num_layers or min([num_layers, num_blocks, block_size] + dims) <= 0 or rope_dim < 0:
            raise ValueError("PagedLatentCache: sizes must be positive (and one latent_dim per layer)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.latent_dims = dims
        self.rope_dim = rope_dim
        self.cache_format = cache_format
        if cache_format is not None and not is_quantized(cache_format):
            quantized_row_layout(cache_format, 1, 0, dtype)  # raises the list of formats
        if cache_format is None:
            widths, store = [r + rope_dim for r in dims], dtype
        else:  # rope_dim values as one key (n_kv=1): the byte count is the same for any split into keys
            widths = [quantized_row_layout(cache_format, r, rope_dim, dtype).row_bytes for r in dims]
            store = torch.uint8
        self.layers: List[torch.Tensor] = [
            torch.empty(num_blocks, block_size, w, dtype=store, device=device) for w in widths
        ]
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._blocks: Dict[object, List[int]] = {}
        self._lens: Dict[object, int] = {}

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers (a quantized row's
        scales and padding included)."""
        return sum(layer.shape[-1] for layer in self.layers) * self.layers[0].element_size()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def length(self, seq_id) -> int:
        return self._lens.get(seq_id, 0)

    def blocks_needed(self, seq_ids: Sequence, counts: Sequence[int]) -> int:
        """New blocks that reserve(seq_ids, counts) would take."""
        need = 0
        for sid, n in zip(seq_ids, counts):
            have = len(self._blocks.get(sid, ())) * self.block_size
            need += max(0, -(-(self.length(sid) + n - have) // self.block_size))
        return need

    def reserve(self, seq_ids: Sequence, counts: Sequence[int]) -> torch.Tensor:
        """Make room for counts[i] new tokens of seq_ids[i]; returns their flat
        slots [sum(counts)] int64, in order. All-or-nothing: if the cache is
        too small nothing is taken and a RuntimeError says how short it is."""
        need = self.blocks_needed(seq_ids, counts)
        if need > len(self._free):
            raise RuntimeError(
                f"PagedLatentCache: out of blocks: {need} more needed, {len(self._free)} free "
                f"(of {self.num_blocks} x {self.block_size} tokens); allocate a larger cache or free sequences"
            )
        slots = []
        for sid, n in zip(seq_ids, counts):
            blocks = self._blocks.setdefault(sid, [])
            start = self.length(sid)
            while len(blocks) * self.block_size < start + n:
                blocks.append(self._free.pop())
            for pos in range(start, start + n):
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            self._lens[sid] = start + n
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def block_table(self, seq_ids: Sequence) -> torch.Tensor:
        """[B, max_blocks] int32; unused entries hold 0 (never read, since
        attention stops at seq_lens). Built in one tensor call: this runs
        once per decode step, on the host."""
        lists = [self._blocks.get(s, []) for s in seq_ids]
        width = max([len(b) for b in lists] + [1])
        table = torch.tensor([b + [0] * (width - len(b)) for b in lists], dtype=torch.int32)
        return table.view(len(lists), width).to(self.device)

    def seq_lens(self, seq_ids: Sequence) -> torch.Tensor:
        return torch.tensor([self.length(s) for s in seq_ids], dtype=torch.int32, device=self.device)

    def grow(self, num_blocks: int) -> None:
        """Enlarge every layer to num_blocks blocks (one copy of the cache);
        block ids, slots and tables already handed out stay valid."""
        if num_blocks <= self.num_blocks:
            return
        for i, old in enumerate(self.layers):
            new = torch.empty((num_blocks,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
            new[: self.num_blocks] = old
            self.layers[i] = new
        self._free = list(range(num_blocks - 1, self.num_blocks - 1, -1)) + self._free
        self.num_blocks = num_blocks

    def free(self, seq_id) -> None:
        self._free.extend(reversed(self._blocks.pop(seq_id, [])))
        self._lens.pop(seq_id, None)
