import pytest
import torch

import mla_cuda


def test_paged_cache_reserve_free_and_tables():
    cache = mla_cuda.PagedLatentCache(num_layers=2, num_blocks=4, block_size=3, latent_dim=5, rope_dim=2,
                                      dtype=torch.float32)
    slots = cache.reserve(["a", "b"], [4, 2])
    assert slots.tolist()[:4] == [slots[0].item(), slots[0].item() + 1, slots[0].item() + 2, slots[3].item()]
    assert cache.seq_lens(["a", "b"]).tolist() == [4, 2]
    table = cache.block_table(["a", "b"])
    assert table.shape == (2, 2) and table.dtype == torch.int32
    # a token's slot is block_table[pos // bs] * bs + pos % bs
    assert slots[3].item() == table[0, 1].item() * 3
    assert cache.free_blocks == 1
    with pytest.raises(RuntimeError, match="out of blocks"):
        cache.reserve(["b"], [5])
    assert cache.seq_lens(["b"]).tolist() == [2] and cache.free_blocks == 1  # nothing taken
    cache.free("a")
    assert cache.free_blocks == 3
    assert cache.bytes_per_token == 2 * 7 * 4
