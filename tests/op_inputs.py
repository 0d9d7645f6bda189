"""Random inputs for the op tests, shared by the CPU and GPU suites: fresh
random values (never zeros), caches whose unused slots hold NaN, block
tables randomly permuted with unused entries set to a huge index."""
import torch


def make_paged_cache(seq_lens, R, n_kv, r, block_size, dtype, device="cpu", spare_blocks=3):
    """Fills the first seq_lens[b] slots of each sequence with random rows,
    everything else with NaN. Returns (cache, block_table int32); block ids
    are a random permutation, unused table entries a huge index."""
    blocks_per_seq = [max(1, -(-L // block_size)) for L in seq_lens]
    max_blocks = max(blocks_per_seq + [1]) + 1  # one spare column, never read
    num_blocks = sum(blocks_per_seq) + spare_blocks
    D = R + n_kv * 2 * r
    cache = torch.randn(num_blocks, block_size, D, device=device).to(dtype)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
    perm = torch.randperm(num_blocks, device=device).int()
    table = torch.full((len(seq_lens), max_blocks), 2**30, dtype=torch.int32, device=device)
    nxt = 0
    for b, L in enumerate(seq_lens):
        nb = blocks_per_seq[b]
        ids = perm[nxt : nxt + nb]
        nxt += nb
        table[b, :nb] = ids
        used[ids.long()] = True
        used[ids[-1].long(), L - (nb - 1) * block_size :] = False
    cache[~used] = float("nan")
    return cache, table


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
