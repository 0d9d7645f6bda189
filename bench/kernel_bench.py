#!/usr/bin/env python
"""Kernel benchmark of the mla_cuda ops on one GPU, against the baselines a
user compares with, all in one run.

Decode attention (bf16, one layer, one step, random permuted block tables,
block size 64): mla_cuda.attention over the latent cache against PyTorch's
scaled_dot_product_attention over the original model's full K/V with its
default dispatch (what transformers runs; the headline column) and with the
flash backend pinned, and against the bytes floor (latent bytes at the
card's device-to-device copy bandwidth, measured in the same run). Every row
reports achieved GB/s, the fraction of copy bandwidth and TFLOP/s.
Cache append (fused RoPE) and partial RoPE are timed at 64k tokens.

Timing: CUDA events around CUDA-graph replays of several calls (no host
time in the figure; eager back-to-back calls where capture fails), after a
warm-up, median of several replays; inputs rotate through enough copies to
exceed three times the L2 cache, so every call reads from DRAM.

With --cache-formats, the attention rows also time mla_cuda.attention over
quantized latent caches of those formats (fp8, int4, ...: the same shapes,
rows written by the quantizing append), against the 16-bit latent kernel
and SDPA of the same row.

Writes kernels_<card>.json and .md under --out (default bench/results), or
kernels_quantized_<card> with --cache-formats."""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name: (n_h, n_kv, head_dim, R = n_kv * d_kv, r, original K/V to compare with)
SHAPES = {
    "SmolLM2-135M d_kv=32": (9, 3, 64, 96, 4, True),
    "SmolLM2-135M d_kv=16": (9, 3, 64, 48, 4, True),
    "Llama-2-7B d_kv=64": (32, 32, 128, 2048, 8, True),
    "Llama-2-7B d_kv=32": (32, 32, 128, 1024, 8, True),
    "Llama-2-7B d_kv=16": (32, 32, 128, 512, 8, True),
    "Llama-3-8B-like d_kv=64": (32, 8, 128, 512, 8, True),
    # DeepSeek's own layout (512 latent + 64 shared rope, 128 heads, qk head
    # dim 192): there is no original K/V model to compare with.
    "DeepSeek-like 512+64": (128, 1, 192, 512, 32, False),
}
BATCHES = (1, 16, 64, 256)
CONTEXTS = (4096, 16384, 32768)
EXTRA_CASES = ((256, 2048),)
QUICK_CASES = ((1, 32768), (64, 4096), (64, 16384), (256, 2048))
BLOCK_SIZE = 64
MEMORY_OP_TOKENS = 65536
MEMORY_FRACTION = 0.6  # of free GPU memory one input set (all its copies) may take


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))


def copies_needed(bytes_each: int) -> int:
    """Input sets to rotate through so that consecutive calls miss L2."""
    return max(1, min(256, math.ceil(3 * l2_bytes() / max(bytes_each, 1))))


def fits(total_bytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return total_bytes <= MEMORY_FRACTION * free


def _eager_ms(fns, calls: int, repeats: int) -> float:
    times = []
    for rep in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fns[(rep * calls + i) % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_ms(fns, calls: int = 20, repeats: int = 10, graph: bool = True):
    """Median milliseconds of one call and how it was timed ("graph" or
    "eager"). fns are closures over distinct input sets, called in turn."""
    calls = max(calls, len(fns))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernel selection, workspaces, allocator
        for i in range(min(3, len(fns)) + 2):
            fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                for i in range(calls):
                    fns[i % len(fns)]()
        except RuntimeError:
            del g
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            g.replay()  # first replay uploads the graph
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
            del g
            torch.cuda.empty_cache()
            return statistics.median(times), "graph"
    return _eager_ms(fns, calls, repeats), "eager"


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, GB/s counting bytes read plus written."""
    a = torch.empty(1 << 29, device="cuda")
    b = torch.empty_like(a)
    ms, _ = time_ms([lambda: b.copy_(a)], calls=10, repeats=10, graph=False)
    bw = 2 * a.numel() * a.element_size() / ms / 1e6
    del a, b
    torch.cuda.empty_cache()
    return bw


def sdpa_default_backend(q, k, v, gqa: bool) -> str:
    """The backend PyTorch's default dispatch picks for these inputs."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=None, enable_gqa=gqa)
        return SDPBackend(choice).name.lower()
    except Exception:  # a private helper: its signature may change
        return "unknown"


def naive_absorbed(q_latent, q_rope, cache, table, lens, scale, R, rope_heads):
    """Straightforward PyTorch absorbed decode over the paged cache (every
    sequence the same length): gather, two matmuls, softmax."""
    B, H, _ = q_latent.shape
    L, bs = int(lens[0]), cache.shape[1]
    t = torch.arange(L, device=cache.device)
    rows = cache[table[:, t // bs].long(), t % bs]  # [B, L, D]
    c = rows[..., :R]
    k_rope = rows[..., R:].unflatten(-1, (rope_heads, -1)).repeat_interleave(H // rope_heads, dim=2)  # [B, L, H, 2r]
    s = torch.einsum("bhr,blr->bhl", q_latent, c) + torch.einsum("bhp,blhp->bhl", q_rope, k_rope)
    p = torch.softmax(s.float() * scale, dim=-1).to(c.dtype)
    return torch.einsum("bhl,blr->bhr", p, c)


def latent_layout(name: str, rope_layout: str):
    """(n_h, n_kv, d_h, R, rope heads in the cache row, rope width per head)."""
    n_h, n_kv, d_h, R, r, _ = SHAPES[name]
    if rope_layout == "shared":  # what converted mha2mla models cache: one key of all n_kv*r pairs
        return n_h, n_kv, d_h, R, 1, 2 * n_kv * r
    return n_h, n_kv, d_h, R, n_kv, 2 * r


def random_block_table(num_blocks: int, B: int) -> torch.Tensor:
    """B sequences of num_blocks / B blocks each, in a random permutation
    of the cache's blocks (consecutive tokens never in adjacent blocks)."""
    return torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(B, -1)


def decode_step_inputs(B, L, n_h, R, rope_w, dtype):
    """Sequence lengths (all L) and one step's random queries."""
    return (torch.full((B,), L, dtype=torch.int32, device="cuda"),
            torch.randn(B, 1, n_h, R, device="cuda", dtype=dtype),
            torch.randn(B, 1, n_h, rope_w, device="cuda", dtype=dtype))


def bench_ours(name, B, L, rope_layout, naive=False, calls=20, repeats=10, dtype=torch.bfloat16) -> dict:
    """mla_cuda.attention (the op a CUDA graph replays) at one shape."""
    n_h, n_kv, d_h, R, rope_heads, rope_w = latent_layout(name, rope_layout)
    D = R + rope_heads * rope_w
    num_blocks = B * L // BLOCK_SIZE
    latent_bytes = num_blocks * BLOCK_SIZE * D * 2
    # per head and token: a score over R latent + the head's rope dims, an output over R
    row = dict(shape=name, batch=B, context=L, n_h=n_h, R=R, rope=rope_heads * rope_w, latent_bytes=latent_bytes,
               flops=2 * B * n_h * L * (2 * R + rope_w))
    n_copies = copies_needed(latent_bytes)
    if not fits(n_copies * latent_bytes + B * n_h * R * 4 * 64):
        row["skipped"] = "memory"
        return row

    def make():
        cache = torch.randn(num_blocks, BLOCK_SIZE, D, device="cuda", dtype=dtype)
        return cache, random_block_table(num_blocks, B)

    sets = [make() for _ in range(n_copies)]
    lens, q_latent, q_rope = decode_step_inputs(B, L, n_h, R, rope_w, dtype)
    scale = 1 / math.sqrt(d_h)
    op = torch.ops.mla_cuda.mla_attention
    row["ours_ms"], row["timing"] = time_ms([lambda s=s: op(q_latent, q_rope, s[0], s[1], lens, scale, 0) for s in sets],
                                              calls, repeats)
    if naive:
        try:
            row["naive_ms"], _ = time_ms([lambda s=s: naive_absorbed(q_latent[:, 0], q_rope[:, 0], s[0], s[1], lens,
                                                                     scale, R, rope_heads) for s in sets[:2]],
                                         calls=4, repeats=5, graph=False)
        except torch.OutOfMemoryError:
            row["naive_ms"] = None
    del sets
    torch.cuda.empty_cache()
    return row


def bench_quantized(name, B, L, rope_layout, cache_format, calls=20, repeats=10, dtype=torch.bfloat16) -> dict:
    """mla_cuda.attention over a quantized latent cache of `cache_format`
    at one shape: {format: {ms, bytes, GBps}} or {format: {skipped}}."""
    from mla_cuda.cache_format import row_bytes

    n_h, n_kv, d_h, R, rope_heads, rope_w = latent_layout(name, rope_layout)
    num_blocks = B * L // BLOCK_SIZE
    row = row_bytes(cache_format, R, rope_heads * rope_w, dtype)
    cache_bytes = num_blocks * BLOCK_SIZE * row
    n_copies = copies_needed(cache_bytes)
    if not fits(n_copies * cache_bytes + B * n_h * R * 4 * 64):
        return dict(skipped="memory")
    append = torch.ops.mla_cuda.latent_cache_append_quantized

    def make():
        cache = torch.empty(num_blocks, BLOCK_SIZE, row, device="cuda", dtype=torch.uint8)
        step = 1 << 20  # tokens quantized per append call
        for t0 in range(0, num_blocks * BLOCK_SIZE, step):
            n = min(step, num_blocks * BLOCK_SIZE - t0)
            append(torch.randn(n, R, device="cuda", dtype=dtype), torch.randn(n, rope_heads, rope_w, device="cuda", dtype=dtype),
                   cache, torch.arange(t0, t0 + n, device="cuda"), cache_format, None, None, None)
        return cache, random_block_table(num_blocks, B)

    sets = [make() for _ in range(n_copies)]
    lens, q_latent, q_rope = decode_step_inputs(B, L, n_h, R, rope_w, dtype)
    op = torch.ops.mla_cuda.mla_attention_quantized
    ms, _ = time_ms([lambda s=s: op(q_latent, q_rope, s[0], s[1], lens, 1 / math.sqrt(d_h), cache_format, rope_heads)
                     for s in sets], calls, repeats)
    del sets
    torch.cuda.empty_cache()
    return dict(ms=ms, bytes=cache_bytes, GBps=cache_bytes / ms / 1e6)


def bench_sdpa(name, B, L, dtype=torch.bfloat16) -> dict:
    """SDPA decoding one query over the original model's full K/V cache:
    default dispatch, and the flash backend pinned."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_h, n_kv, d_h, _, _, has_original = SHAPES[name]
    if not has_original:
        return {}
    kv_bytes = 2 * B * n_kv * L * d_h * 2
    res = dict(full_kv_bytes=kv_bytes)
    n_copies = copies_needed(kv_bytes)
    if not fits(n_copies * kv_bytes):
        res["sdpa_skipped"] = "memory"
        return res
    sets = [(torch.randn(B, n_kv, L, d_h, device="cuda", dtype=dtype), torch.randn(B, n_kv, L, d_h, device="cuda", dtype=dtype))
            for _ in range(n_copies)]
    q = torch.randn(B, n_h, 1, d_h, device="cuda", dtype=dtype)
    gqa = n_h != n_kv
    res["sdpa_default_backend"] = sdpa_default_backend(q, *sets[0], gqa)
    res["sdpa_default_ms"], _ = time_ms([lambda s=s: F.scaled_dot_product_attention(q, *s, enable_gqa=gqa) for s in sets])

    def flash(k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    try:
        res["sdpa_flash_ms"], _ = time_ms([lambda s=s: flash(*s) for s in sets])
    except RuntimeError as e:  # flash does not take this shape or dtype on this card
        res["sdpa_flash_ms"] = None
        res["sdpa_flash_error"] = str(e).splitlines()[0][:120]
    del sets
    torch.cuda.empty_cache()
    return res


def rope_tables(n_kv, r, d_h):
    freq = torch.arange(n_kv * r, device="cuda").view(n_kv, r) % (d_h // 2)
    inv = 1.0 / (10000 ** (torch.arange(d_h // 2, device="cuda", dtype=torch.float32) * 2 / d_h))
    return freq, inv


def bench_append(name, T=MEMORY_OP_TOKENS, dtype=torch.bfloat16) -> dict:
    n_h, n_kv, d_h, R, r, _ = SHAPES[name]
    D = R + n_kv * 2 * r
    bytes_moved = 2 * T * D * 2  # inputs read + rows written (index reads not counted)

    def make():
        cache = torch.empty(T // BLOCK_SIZE + 1, BLOCK_SIZE, D, device="cuda", dtype=dtype)
        slots = torch.arange(T, device="cuda")  # a prefill's consecutive slots
        return (torch.randn(T, R, device="cuda", dtype=dtype), torch.randn(T, n_kv, 2 * r, device="cuda", dtype=dtype),
                cache, slots, torch.arange(T, device="cuda"))

    sets = [make() for _ in range(copies_needed(bytes_moved))]
    freq, inv = rope_tables(n_kv, r, d_h)
    op = torch.ops.mla_cuda.latent_cache_append
    ms, how = time_ms([lambda s=s: op(s[0], s[1], s[2], s[3], s[4], freq, inv) for s in sets])
    return dict(op="append (fused RoPE)", shape=name, tokens=T, ms=ms, timing=how, bytes=bytes_moved,
                GBps=bytes_moved / ms / 1e6)


def bench_rope(name, T=MEMORY_OP_TOKENS, dtype=torch.bfloat16) -> dict:
    n_h, n_kv, d_h, _, r, _ = SHAPES[name]
    bytes_moved = 2 * T * (n_h + n_kv) * 2 * r * 2  # q and k read and written

    def make():
        return (torch.randn(T, n_h, 2 * r, device="cuda", dtype=dtype), torch.randn(T, n_kv, 2 * r, device="cuda", dtype=dtype),
                torch.randint(0, 32768, (T,), device="cuda"))

    sets = [make() for _ in range(copies_needed(bytes_moved))]
    freq, inv = rope_tables(n_kv, r, d_h)
    op = torch.ops.mla_cuda.partial_rope_
    ms, how = time_ms([lambda s=s: op(s[0], s[1], s[2], freq, inv, False) for s in sets])
    return dict(op="partial RoPE (in place, q and k)", shape=name, tokens=T, ms=ms, timing=how, bytes=bytes_moved,
                GBps=bytes_moved / ms / 1e6)


def same_bytes_copy_ms(nbytes: int) -> float:
    """A device-to-device copy moving nbytes (half read, half written) as
    one call, through enough buffer pairs that every call misses L2: what a
    plain copy of a memory op's bytes achieves at its size, launch and tail
    included, beside the 2 GiB copy bandwidth."""
    n = max(1, nbytes // 4)  # bf16 elements per side
    pairs = [(torch.empty(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16))
             for _ in range(copies_needed(nbytes))]
    ms, _ = time_ms([lambda p=p: p[1].copy_(p[0]) for p in pairs])
    del pairs
    torch.cuda.empty_cache()
    return ms


def cases(quick: bool):
    if quick:
        return list(QUICK_CASES)
    return [(b, c) for c in CONTEXTS for b in BATCHES] + list(EXTRA_CASES)


def fma_times(args) -> dict:
    """The FMA kernel's times at the same rows, from a child process that
    starts with MLA_DECODE_KERNEL=fma (the knob may be read once per
    process). (shape, batch, context) -> ms."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fma.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--ours-only", path, "--rope-layout", args.rope_layout]
        cmd += ["--shapes", *args.shapes] + (["--quick"] if args.quick else [])
        env = dict(os.environ, MLA_DECODE_KERNEL="fma")
        if subprocess.run(cmd, env=env).returncode != 0:
            return {}
        with open(path) as f:
            return {(r["shape"], r["batch"], r["context"]): r.get("ours_ms") for r in json.load(f)}


def run(args) -> dict:
    card = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s", flush=True)
    res = dict(card=card, torch=torch.__version__, copy_GBps=bw, l2_bytes=l2_bytes(), block_size=BLOCK_SIZE,
               rope_layout=args.rope_layout, dtype="bfloat16", attention=[], memory_ops=[])
    for name in args.shapes:
        for B, L in cases(args.quick):
            row = bench_ours(name, B, L, args.rope_layout, naive=args.naive)
            if "skipped" not in row:
                row.update(bench_sdpa(name, B, L))
                finish_row(row, bw)
                row["quantized"] = {}
                for fmt in args.cache_formats:
                    q = bench_quantized(name, B, L, args.rope_layout, fmt)
                    if "ms" in q:
                        q["frac_of_copy_bw"] = q["GBps"] / bw
                        q["speedup_vs_16bit"] = row["ours_ms"] / q["ms"]
                        if row.get("sdpa_default_ms"):
                            q["speedup_vs_sdpa_default"] = row["sdpa_default_ms"] / q["ms"]
                    row["quantized"][fmt] = q
            res["attention"].append(row)
            print(json.dumps(row), flush=True)
    if args.fma:
        fma = fma_times(args)
        for row in res["attention"]:
            row["fma_kernel_ms"] = fma.get((row["shape"], row["batch"], row["context"]))
    if not args.no_memory_ops:
        for name in ("SmolLM2-135M d_kv=32", "Llama-2-7B d_kv=64"):
            for fn in (bench_append, bench_rope):
                r = fn(name)
                r["frac_of_copy_bw"] = r["GBps"] / bw
                r["same_bytes_copy_ms"] = same_bytes_copy_ms(r["bytes"])
                r["same_bytes_copy_frac"] = r["bytes"] / r["same_bytes_copy_ms"] / 1e6 / bw
                res["memory_ops"].append(r)
                print(json.dumps(r), flush=True)
    return res


def finish_row(row: dict, bw: float) -> None:
    """Derived figures of one attention row (bw: copy GB/s)."""
    ms = row["ours_ms"]
    row["ours_GBps"] = row["latent_bytes"] / ms / 1e6
    row["frac_of_copy_bw"] = row["ours_GBps"] / bw
    row["floor_ms"] = row["latent_bytes"] / bw / 1e6
    row["ours_TFLOPs"] = row["flops"] / ms / 1e9
    if row.get("sdpa_default_ms"):
        kv = row["full_kv_bytes"]
        row["bytes_ratio"] = kv / row["latent_bytes"]
        row["sdpa_default_GBps"] = kv / row["sdpa_default_ms"] / 1e6
        row["speedup_vs_sdpa_default"] = row["sdpa_default_ms"] / ms
        if row.get("sdpa_flash_ms"):
            row["sdpa_flash_GBps"] = kv / row["sdpa_flash_ms"] / 1e6
            row["speedup_vs_sdpa_flash"] = row["sdpa_flash_ms"] / ms


def _f(x, fmt, missing="-", suffix=""):
    return format(x, fmt) + suffix if isinstance(x, (int, float)) else missing


def markdown(res: dict) -> str:
    fma = any("fma_kernel_ms" in r for r in res["attention"])
    lines = [
        f"# mla_cuda kernels on {res['card']} (torch {res['torch']}, bf16)",
        "",
        f"Device-to-device copy bandwidth, measured in this run: **{res['copy_GBps']:.0f} GB/s** (bytes read + "
        f"written). L2: {res['l2_bytes'] / 2**20:.0f} MiB; every call reads inputs not in L2.",
        "",
        "## Decode attention: one layer, one step",
        "",
        "mla_cuda.attention over the latent cache (block size "
        f"{res['block_size']}, random permuted block tables, rope keys cached {res['rope_layout']}) against PyTorch "
        "SDPA decoding one query over the original model's full K/V: with its default dispatch (what "
        "transformers runs) and with the flash backend pinned. Floor: the latent bytes at the copy bandwidth. "
        "Bytes ratio: full K/V bytes over latent bytes, the bound on the speed-up. Times: CUDA-graph replays, "
        "median.",
        "",
        "| shape (n_h, R + rope) | batch x context | latent MB | ours ms | ours GB/s (% of copy) | TFLOP/s | floor ms "
        "| SDPA default ms (backend) | SDPA default GB/s | SDPA flash ms | ours vs SDPA default | ours vs SDPA flash "
        "| bytes ratio |" + (" FMA kernel ms |" if fma else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fma else ""),
    ]
    for r in res["attention"]:
        head = f"| {r['shape']} ({r['n_h']}, {r['R']} + {r['rope']}) | {r['batch']} x {r['context']} | {r['latent_bytes'] / 1e6:.1f} "
        if "skipped" in r:
            lines.append(head + f"| skipped ({r['skipped']}) |" + " |" * (9 + fma))
            continue
        if "sdpa_default_ms" in r:
            sdpa = (f"| {r['sdpa_default_ms']:.4f} ({r['sdpa_default_backend']}) | {r['sdpa_default_GBps']:.0f} "
                    f"| {_f(r.get('sdpa_flash_ms'), '.4f', 'n/a')} | **{r['speedup_vs_sdpa_default']:.2f}x** "
                    f"| {_f(r.get('speedup_vs_sdpa_flash'), '.2f', suffix='x')} "
                    f"| {r['bytes_ratio']:.1f} ")
        elif r.get("sdpa_skipped"):
            sdpa = f"| skipped ({r['sdpa_skipped']}) | - | - | - | - | - "
        else:
            sdpa = "| - | - | - | - | - | - "
        lines.append(head + f"| {r['ours_ms']:.4f} | {r['ours_GBps']:.0f} ({100 * r['frac_of_copy_bw']:.0f}%) "
                     f"| {r['ours_TFLOPs']:.1f} | {r['floor_ms']:.4f} " + sdpa + "|"
                     + (f" {_f(r.get('fma_kernel_ms'), '.4f')} |" if fma else ""))
    quant = [r for r in res["attention"] if r.get("quantized")]
    if quant:
        lines += ["", "## Decode attention over quantized latent caches", "",
                  "mla_cuda.attention over quantized rows (latent codes, float32 scales, rope keys in bf16) at the "
                  "same shapes, against the 16-bit latent kernel and SDPA default of the same row above. Bytes: the "
                  "quantized cache read by the call.", "",
                  "| shape | batch x context | format | cache MB | ms | GB/s (% of copy) | vs 16-bit latent | vs SDPA default |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in quant:
            for fmt, q in r["quantized"].items():
                head = f"| {r['shape']} | {r['batch']} x {r['context']} | {fmt} "
                if "skipped" in q:
                    lines.append(head + f"| skipped ({q['skipped']}) | | | | |")
                    continue
                lines.append(head + f"| {q['bytes'] / 1e6:.1f} | {q['ms']:.4f} | {q['GBps']:.0f} "
                             f"({100 * q['frac_of_copy_bw']:.0f}%) | {q['speedup_vs_16bit']:.2f}x "
                             f"| {_f(q.get('speedup_vs_sdpa_default'), '.2f', suffix='x')} |")
    if res["memory_ops"]:
        lines += ["", "## Memory-bound ops", "",
                  "Bytes moved: inputs read and outputs written. Copy of the same bytes: one device-to-device copy "
                  "call moving as many bytes, timed the same way (what a plain copy reaches at that size).", "",
                  "| op | shape | tokens | MB moved | ms | GB/s | % of copy | copy of the same bytes: ms (% of copy) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["memory_ops"]:
            same = (f"{r['same_bytes_copy_ms']:.4f} ({100 * r['same_bytes_copy_frac']:.0f}%)"
                    if r.get("same_bytes_copy_ms") else "-")
            lines.append(f"| {r['op']} | {r['shape']} | {r['tokens']} | {r['bytes'] / 1e6:.1f} | {r['ms']:.4f} "
                         f"| {r['GBps']:.0f} | {100 * r['frac_of_copy_bw']:.0f}% | {same} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/kernel_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=RESULTS, help="directory for kernels_<card>.json and .md (default: bench/results)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                   help="attention shapes (default: all): " + "; ".join(SHAPES))
    p.add_argument("--quick", action="store_true",
                   help="only " + ", ".join(f"{b} x {c}" for b, c in QUICK_CASES) + " (default: batch "
                   + "/".join(map(str, BATCHES)) + " x context " + "/".join(map(str, CONTEXTS)) + ", and 256 x 2048)")
    p.add_argument("--rope-layout", choices=("shared", "per-head"), default="shared",
                   help="cache rows with one rope key of all n_kv*r pairs (what converted models cache) or one per KV head")
    p.add_argument("--fma", action="store_true", help="also time the FMA kernel (float32 / pre-sm_80 path), in a child process")
    p.add_argument("--naive", action="store_true", help="also time a plain PyTorch absorbed decode (gather, matmul, softmax)")
    p.add_argument("--no-memory-ops", action="store_true", help="skip the append and partial RoPE rows")
    p.add_argument("--cache-formats", nargs="+", default=[], metavar="FORMAT",
                   help="also time attention over quantized latent caches of these formats (fp8, int4, fp8-g<N>, "
                   "int4-g<N>) at every attention row")
    p.add_argument("--ours-only", metavar="JSON", help=argparse.SUPPRESS)  # the --fma child: our op only, rows to JSON
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_bench.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    import mla_cuda  # noqa: F401  (registers torch.ops.mla_cuda)

    if args.ours_only:
        # the FMA kernel is up to ~10x slower: fewer calls per figure
        rows = [bench_ours(name, B, L, args.rope_layout, calls=2, repeats=3) for name in args.shapes
                for B, L in cases(args.quick)]
        with open(args.ours_only, "w") as f:
            json.dump(rows, f)
        return 0
    from mha2mla.results import save_results

    t0 = time.time()
    res = run(args)
    res["seconds"] = time.time() - t0
    path = save_results(args.out, "kernels_quantized" if args.cache_formats else "kernels", res["card"], res,
                        markdown(res))
    print(f"wrote {path}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
