import pytest
import torch

import mla_cuda


def test_paged_cache_reserve_free_and_tables():
    cache = mla_cuda.PagedLatentCache(num_layers=2, num_blocks=4, block_size=3, latent_dim=5, rope_dim=2,
                                      dtype=torch.float32)
    slots = cache.reserve(["a", "b"], [4, 2])
    assert cache.seq_lens(["a", "b"]).tolist() == [4, 2]
    table = cache.block_table(["a", "b"])
    assert table.shape == (2, 2) and table.dtype == torch.int32
    # three distinct blocks: two for a's 4 tokens, one for b's 2
    assert len({table[0, 0].item(), table[0, 1].item(), table[1, 0].item()}) == 3
    # a token's slot is block_table[pos // bs] * bs + pos % bs
    want = [table[i, pos // 3].item() * 3 + pos % 3 for i, n in enumerate([4, 2]) for pos in range(n)]
    assert slots.tolist() == want
    assert cache.free_blocks == 1
    with pytest.raises(RuntimeError, match="out of blocks"):
        cache.reserve(["b"], [5])
    assert cache.seq_lens(["b"]).tolist() == [2] and cache.free_blocks == 1  # nothing taken
    cache.free("a")
    assert cache.free_blocks == 3
    assert cache.bytes_per_token == 2 * 7 * 4
