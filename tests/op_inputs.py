"""Random inputs for the op tests, shared by the CPU and GPU suites: fresh
random values (never zeros), caches whose unused slots hold NaN, block
tables randomly permuted with unused entries set to a huge index."""
import torch


def make_paged_cache(seq_lens, R, n_kv, r, block_size, dtype, device="cpu", spare_blocks=3):
    """Fills the first seq_lens[b] slots of each sequence with random rows,
    everything else with NaN. Returns (cache, block_table int32)."""
    blocks_per_seq = [max(1, -(-L // block_size)) for L in seq_lens]
    max_blocks = max(blocks_per_seq + [1]) + 1  # one spare column, never read
    num_blocks = sum(blocks_per_seq) + spare_blocks
    D = R + n_kv * 2 * r
    cache = torch.full((num_blocks, block_size, D), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks)
    table = torch.full((len(seq_lens), max_blocks), 2**30, dtype=torch.int32)
    nxt = 0
    for b, L in enumerate(seq_lens):
        for i in range(blocks_per_seq[b]):
            blk = int(perm[nxt])
            nxt += 1
            table[b, i] = blk
            n = min(block_size, L - i * block_size)
            if n > 0:
                cache[blk, :n] = torch.randn(n, D).to(dtype)
    return cache.to(device), table.to(device)


def make_queries(B, Q, H, R, r, dtype, device="cpu"):
    q_latent = torch.randn(B, Q, H, R).to(dtype).to(device)
    q_rope = torch.randn(B, Q, H, 2 * r).to(dtype).to(device)
    return q_latent, q_rope


def make_rope_tables(n_kv, r, head_dim, device="cpu"):
    """A random choice of r of the head_dim/2 frequencies per KV head, and
    Llama-style inverse frequencies."""
    half = head_dim // 2
    freq_idx = torch.stack([torch.randperm(half)[:r].sort().values for _ in range(n_kv)])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) * 2 / head_dim))
    return freq_idx.to(device), inv_freq.to(device)
