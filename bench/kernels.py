"""Kernel benchmark: mla_cuda ops against the baselines users compare with,
on one card, in one process (CUDA events, warm-up, median of many, inputs
rotated through more memory than L2 holds)."""
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import mla_cuda  # noqa: F401  (registers torch.ops.mla_cuda)

from .results import save_results

# name: (n_h, n_kv, head_dim, R = n_kv*d_kv, r)
SHAPES = {
    "smollm2-135m dkv32": (9, 3, 64, 96, 4),
    "smollm2-135m dkv16": (9, 3, 64, 48, 4),
    "llama2-7b dkv64": (32, 32, 128, 2048, 8),
    "llama2-7b dkv32": (32, 32, 128, 1024, 8),
}
CASES = [(64, 4096), (1, 32768)]


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


def time_op(fns, warmup=5, iters=50) -> float:
    """Median milliseconds of one call; fns are closures over distinct input
    sets, called in turn so consecutive calls do not hit L2."""
    for i in range(warmup):
        fns[i % len(fns)]()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus written."""
    n = 1 << 28  # 1 GiB of float32
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    ms = time_op([lambda: b.copy_(a)], warmup=3, iters=20)
    return 2 * a.numel() * 4 / ms / 1e6


def copies(make, bytes_each):
    """Enough independent input sets to exceed twice the L2."""
    n = max(1, math.ceil(2 * l2_bytes() / max(bytes_each, 1)))
    return [make() for _ in range(min(n, 8))]


def naive_absorbed(q_latent, q_rope, cache, table, lens, scale, R, n_kv):
    """Straightforward PyTorch absorbed MLA decode over the paged cache
    (every sequence the same length here): gather, two matmuls, softmax."""
    B, H, _ = q_latent.shape
    L = int(lens[0])
    bs = cache.shape[1]
    t = torch.arange(L, device=cache.device)
    rows = cache[table[:, t // bs].long(), t % bs]  # [B, L, D]
    c = rows[..., :R]
    k_rope = rows[..., R:].unflatten(-1, (n_kv, -1)).repeat_interleave(H // n_kv, dim=2)  # [B, L, H, 2r]
    s = torch.einsum("bhr,blr->bhl", q_latent, c) + torch.einsum("bhp,blhp->bhl", q_rope, k_rope)
    p = torch.softmax(s.float() * scale, dim=-1).to(c.dtype)
    return torch.einsum("bhl,blr->bhr", p, c)


def bench_attention(name, B, L, dtype=torch.bfloat16, block_size=64):
    H, n_kv, d_h, R, r = SHAPES[name]
    D = R + n_kv * 2 * r
    nb = B * L // block_size
    cache_bytes = nb * block_size * D * 2

    def make():
        cache = torch.randn(nb, block_size, D, device="cuda", dtype=dtype)
        table = torch.randperm(nb, device="cuda", dtype=torch.int32).view(B, -1)
        return cache, table

    sets = copies(make, cache_bytes)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q_latent = torch.randn(B, H, R, device="cuda", dtype=dtype)
    q_rope = torch.randn(B, H, 2 * r, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(d_h)
    res = dict(shape=name, batch=B, context=L, latent_bytes=cache_bytes)
    # the op itself (what a CUDA graph replays); the Python wrapper adds only host time
    q4, r4 = q_latent.unsqueeze(1), q_rope.unsqueeze(1)
    ours = [lambda s=s: torch.ops.mla_cuda.mla_attention(q4, r4, s[0], s[1], lens, scale, 0) for s in sets]
    res["ours_ms"] = time_op(ours)
    # the FMA kernel (float32 path, and what 16-bit used before the tensor-core kernel)
    os.environ["MLA_DECODE_KERNEL"] = "fma"
    try:
        res["fma_kernel_ms"] = time_op(ours, warmup=2, iters=10)
    finally:
        os.environ.pop("MLA_DECODE_KERNEL")
    try:
        res["naive_ms"] = time_op([lambda s=s: naive_absorbed(q_latent, q_rope, s[0], s[1], lens, scale, R, n_kv)
                                   for s in sets[:2]], warmup=2, iters=10)
    except torch.OutOfMemoryError:
        res["naive_ms"] = None
    del sets
    torch.cuda.empty_cache()
    # the original model: SDPA (flash) over the full K/V cache
    kv_bytes = 2 * B * n_kv * L * d_h * 2

    def make_kv():
        return (torch.randn(B, n_kv, L, d_h, device="cuda", dtype=dtype), torch.randn(B, n_kv, L, d_h, device="cuda", dtype=dtype))

    kv_sets = copies(make_kv, kv_bytes)
    q = torch.randn(B, H, 1, d_h, device="cuda", dtype=dtype)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = "flash"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, *kv_sets[0], enable_gqa=True)
    except RuntimeError:
        backend = "efficient"

    def sdpa(k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if backend == "flash" else SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    res["sdpa_ms"] = time_op([lambda s=s: sdpa(*s) for s in kv_sets])
    res["sdpa_backend"] = backend
    res["full_kv_bytes"] = kv_bytes
    del kv_sets
    torch.cuda.empty_cache()
    res["ours_GBps"] = cache_bytes / res["ours_ms"] / 1e6
    res["sdpa_GBps"] = kv_bytes / res["sdpa_ms"] / 1e6
    res["speedup_vs_sdpa"] = res["sdpa_ms"] / res["ours_ms"]
    return res


def bench_append(name, T=65536, dtype=torch.bfloat16):
    H, n_kv, d_h, R, r = SHAPES[name]
    D = R + n_kv * 2 * r
    bytes_moved = 2 * T * D * 2  # read inputs + write rows

    def make():
        cache = torch.empty(T // 16 + 1, 16, D, device="cuda", dtype=dtype)
        return (torch.randn(T, R, device="cuda", dtype=dtype), torch.randn(T, n_kv, 2 * r, device="cuda", dtype=dtype),
                cache, torch.arange(T, device="cuda"), torch.arange(T, device="cuda"))

    sets = copies(make, bytes_moved)
    freq = torch.arange(n_kv * r, device="cuda").view(n_kv, r) % (d_h // 2)
    inv = 1.0 / (10000 ** (torch.arange(d_h // 2, device="cuda", dtype=torch.float32) * 2 / d_h))
    ms = time_op([lambda s=s: torch.ops.mla_cuda.latent_cache_append(s[0], s[1], s[2], s[3], s[4], freq, inv) for s in sets])
    return dict(op="append (fused rope)", shape=name, tokens=T, ms=ms, bytes=bytes_moved, GBps=bytes_moved / ms / 1e6)


def bench_rope(name, T=262144, dtype=torch.bfloat16):
    H, n_kv, d_h, R, r = SHAPES[name]
    bytes_moved = 2 * T * (H + n_kv) * 2 * r * 2

    def make():
        return (torch.randn(T, H, 2 * r, device="cuda", dtype=dtype), torch.randn(T, n_kv, 2 * r, device="cuda", dtype=dtype),
                torch.randint(0, 4096, (T,), device="cuda"))

    sets = copies(make, bytes_moved)
    freq = torch.arange(n_kv * r, device="cuda").view(n_kv, r) % (d_h // 2)
    inv = 1.0 / (10000 ** (torch.arange(d_h // 2, device="cuda", dtype=torch.float32) * 2 / d_h))
    ms = time_op([lambda s=s: torch.ops.mla_cuda.partial_rope_(s[0], s[1], s[2], freq, inv, False) for s in sets])
    return dict(op="partial rope (in place, q+k)", shape=name, tokens=T, ms=ms, bytes=bytes_moved, GBps=bytes_moved / ms / 1e6)


def run(out_dir: str) -> dict:
    card = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    results = dict(card=card, torch=torch.__version__, copy_GBps=bw, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                   attention=[], memory_ops=[])
    for name in SHAPES:
        for B, L in CASES:
            r = bench_attention(name, B, L)
            r["floor_ms"] = r["latent_bytes"] / bw / 1e6
            r["frac_of_copy_bw"] = r["ours_GBps"] / bw
            results["attention"].append(r)
            print(json.dumps(r))
    for name in ("smollm2-135m dkv32", "llama2-7b dkv64"):
        for fn in (bench_append, bench_rope):
            r = fn(name)
            r["frac_of_copy_bw"] = r["GBps"] / bw
            results["memory_ops"].append(r)
            print(json.dumps(r))
    save_results(out_dir, "kernels", card, results, markdown(results))
    return results


def markdown(res: dict) -> str:
    lines = [
        f"# mla_cuda kernels on {res['card']} (torch {res['torch']}, {res['time']})",
        "",
        f"Measured device-to-device copy bandwidth: **{res['copy_GBps']:.0f} GB/s** (read + write).",
        "",
        "## Decode attention, bf16, one layer, one step",
        "",
        "| shape | batch x context | ours ms | latent GB/s (% of copy) | bytes floor ms | FMA kernel ms | naive absorbed ms | SDPA full K/V ms | ours vs SDPA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["attention"]:
        naive = f"{r['naive_ms']:.3f}" if r["naive_ms"] else "OOM"
        lines.append(
            f"| {r['shape']} | {r['batch']} x {r['context']} | {r['ours_ms']:.4f} | {r['ours_GBps']:.0f} ({100 * r['frac_of_copy_bw']:.0f}%) "
            f"| {r['floor_ms']:.4f} | {r['fma_kernel_ms']:.4f} | {naive} | {r['sdpa_ms']:.4f} ({r['sdpa_backend']}) "
            f"| {r['speedup_vs_sdpa']:.2f}x |"
        )
    lines += ["", "## Memory-bound ops, bf16", "", "| op | shape | tokens | ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for r in res["memory_ops"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['tokens']} | {r['ms']:.4f} | {r['GBps']:.0f} | {100 * r['frac_of_copy_bw']:.0f}% |")
    return "\n".join(lines) + "\n"
