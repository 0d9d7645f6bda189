#!/usr/bin/env python
"""Launches the decode kernel a few times at one benchmark shape (bf16,
batch x context, block size 64, random permuted block table), over a 16-bit
latent cache or, with --cache-format, a quantized one, for a profiler:

  ncu -k regex:mla_decode -c 1 --section SpeedOfLight --section Occupancy \\
      --section WarpStateStats python bench/profile_decode.py smollm --cache-format fp8

or, with --kernel-times, prints each kernel's mean GPU time per call (the
decode kernel and the split merge apart) from torch.profiler, the inputs
rotating through enough cache copies that every call reads from DRAM:

  python bench/profile_decode.py llama3 --batch 1 --context 32768 --kernel-times"""
import argparse
import math
import sys

import torch

# name: (n_h, rope heads in the cache row, head_dim, R, rope width per head), as converted models cache them
SHAPES = {
    "smollm": (9, 1, 64, 96, 24),  # SmolLM2-135M d_kv=32
    "smollm16": (9, 1, 64, 48, 24),  # SmolLM2-135M d_kv=16
    "llama": (32, 1, 128, 2048, 512),  # Llama-2-7B d_kv=64
    "llama16": (32, 1, 128, 512, 512),  # Llama-2-7B d_kv=16
    "llama3": (32, 1, 128, 512, 128),  # Llama-3-8B-like d_kv=64
    "deepseek": (128, 1, 192, 512, 64),  # DeepSeek-like 512+64
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/profile_decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", nargs="?", default="smollm", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--kernel-times", action="store_true",
                   help="print each kernel's mean GPU time per call (torch.profiler) instead of just launching")
    p.add_argument("--cache-format", default=None, metavar="FORMAT",
                   help="a quantized latent cache (fp8, int4, fp8-g<N>, int4-g<N>) instead of bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/profile_decode.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    import mla_cuda  # noqa: F401  (registers torch.ops.mla_cuda)
    from kernel_bench import copies_needed  # bench/kernel_bench.py: input sets that together miss L2

    n_h, rope_heads, d_h, R, rope_w = SHAPES[args.shape]
    B, L, block_size = args.batch, args.context, 64
    num_blocks = B * L // block_size
    fmt = args.cache_format
    row = R + rope_heads * rope_w
    if fmt is not None:
        from mla_cuda.cache_format import row_bytes

        row = row_bytes(fmt, R, rope_heads * rope_w, torch.bfloat16)
    cache_bytes = num_blocks * block_size * row * (2 if fmt is None else 1)
    copies = min(32, copies_needed(cache_bytes)) if args.kernel_times else 1

    def make_cache():
        if fmt is None:
            return torch.randn(num_blocks, block_size, row, device="cuda", dtype=torch.bfloat16)
        # rows written by the quantizing append, from random latents and rope keys
        cache = torch.empty(num_blocks, block_size, row, device="cuda", dtype=torch.uint8)
        n = num_blocks * block_size
        torch.ops.mla_cuda.latent_cache_append_quantized(
            torch.randn(n, R, device="cuda").bfloat16(), torch.randn(n, rope_heads, rope_w, device="cuda").bfloat16(),
            cache, torch.arange(n, device="cuda"), fmt, None, None, None)
        return cache

    caches = [make_cache() for _ in range(copies)]
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(B, -1)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, 1, n_h, R, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(B, 1, n_h, rope_w, device="cuda", dtype=torch.bfloat16)
    scale = 1 / math.sqrt(d_h)

    def call(i):
        cache = caches[i % copies]
        if fmt is None:
            torch.ops.mla_cuda.mla_attention(q, q_rope, cache, table, lens, scale, 0)
        else:
            torch.ops.mla_cuda.mla_attention_quantized(q, q_rope, cache, table, lens, scale, fmt, rope_heads)

    if not args.kernel_times:
        for i in range(args.calls):
            call(i)
        torch.cuda.synchronize()
        return 0
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    calls = max(args.calls, 2 * copies, 10)
    for i in range(copies):  # warm-up
        call(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call(i)
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            # "void mla_cuda::(anonymous namespace)::mla_combine_kernel<c10::BFloat16, 4>(...)": the function's name
            name = e.name.replace("(anonymous namespace)::", "").split("<")[0].split("(")[0]
            totals[name] = totals.get(name, 0.0) + e.time_range.elapsed_us()
    print(f"{args.shape} {B} x {L} ({cache_bytes / 1e6:.1f} MB of cache, {copies} copies, {calls} calls):")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {us / calls:9.2f} us  {name}")
    print(f"  {sum(totals.values()) / calls:9.2f} us  all kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
