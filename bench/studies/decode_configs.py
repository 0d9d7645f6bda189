#!/usr/bin/env python
"""Every decode-kernel configuration against the others and against default
SDPA, on the same inputs in one process: the study behind the order in
which mla_attention tries its configurations (MLA_WARP_CONFIGS and
MLA_MMA_CONFIGS in csrc/cuda/mla_decode.cuh) and, with --splits, behind the
flash-decoding split it chooses.

For each shape and batch x context it times mla_cuda.attention with each
named kernel forced (a configuration that does not hold the shape falls back
to the next path, so its time is that path's; the `ran` column says what
"auto" picks), with bench/kernel_bench.py's timing (CUDA-graph replays over
inputs that miss L2), and prints one Markdown table; --json writes the rows.

    python bench/studies/decode_configs.py --shapes "SmolLM2-135M d_kv=32" --cases 1x32768 64x4096
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernel_bench as kb  # noqa: E402  (bench/kernel_bench.py: shapes, timing, copy bandwidth)


def parse_case(text: str):
    try:
        b, l = text.lower().split("x")
        return int(b), int(l)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is BATCHxCONTEXT, e.g. 64x4096, not {text!r}") from None


def time_kernels(name, B, L, kernel_names, splits=(), rope_layout="shared"):
    from mla_cuda._ops import decode_kernel

    n_h, n_kv, d_h, R, rope_heads, rope_w = kb.latent_layout(name, rope_layout)
    D = R + rope_heads * rope_w
    num_blocks = B * L // kb.BLOCK_SIZE
    latent_bytes = num_blocks * kb.BLOCK_SIZE * D * 2
    row = dict(shape=name, batch=B, context=L, latent_bytes=latent_bytes)
    n_copies = kb.copies_needed(latent_bytes)
    if not kb.fits(n_copies * latent_bytes):
        row["skipped"] = "memory"
        return row
    sets = [(torch.randn(num_blocks, kb.BLOCK_SIZE, D, device="cuda", dtype=torch.bfloat16),
             torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(B, -1)) for _ in range(n_copies)]
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q_latent = torch.randn(B, 1, n_h, R, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(B, 1, n_h, rope_w, device="cuda", dtype=torch.bfloat16)
    scale = 1 / math.sqrt(d_h)
    op = torch.ops.mla_cuda.mla_attention
    row["ms"] = {}
    # (column, kernel, split): each named kernel with the split it chooses,
    # then the automatic kernel with each forced split
    runs = [(k, k, 0) for k in kernel_names] + [(f"splits={n}", "auto", n) for n in splits]
    for column, kname, n in runs:
        with decode_kernel(kname):
            row["ms"][column], _ = kb.time_ms([lambda s=s: op(q_latent, q_rope, s[0], s[1], lens, scale, n)
                                               for s in sets])
    del sets
    torch.cuda.empty_cache()
    if kb.SHAPES[name][5]:
        row.update(kb.bench_sdpa(name, B, L))
    return row


def markdown(rows, kernel_names, bw) -> str:
    head = "| shape | batch x context | latent MB | " + " | ".join(kernel_names) + " | SDPA default ms | best vs SDPA |"
    lines = [f"copy bandwidth {bw:.0f} GB/s; cells: ms (GB/s of latent, % of copy)", "", head,
             "|" + "---|" * (4 + len(kernel_names) + 1)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['batch']} x {r['context']} | {r['latent_bytes'] / 1e6:.1f} | skipped |")
            continue
        cells = []
        for k in kernel_names:
            ms = r["ms"][k]
            gbps = r["latent_bytes"] / ms / 1e6
            cells.append(f"{ms:.4f} ({gbps:.0f}, {100 * gbps / bw:.0f}%)")
        sdpa = r.get("sdpa_default_ms")
        best = min(r["ms"].values())
        lines.append(f"| {r['shape']} | {r['batch']} x {r['context']} | {r['latent_bytes'] / 1e6:.1f} | "
                     + " | ".join(cells) + f" | {kb._f(sdpa, '.4f')} | "
                     + (f"{sdpa / best:.2f}x" if sdpa else "-") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/studies/decode_configs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(kb.SHAPES), choices=list(kb.SHAPES), metavar="SHAPE",
                   help="attention shapes (default: all): " + "; ".join(kb.SHAPES))
    p.add_argument("--cases", nargs="+", type=parse_case, default=list(kb.QUICK_CASES), metavar="BxL",
                   help="batch x context cases (default: " + " ".join(f"{b}x{c}" for b, c in kb.QUICK_CASES) + ")")
    p.add_argument("--kernels", nargs="+", metavar="NAME",
                   help="decode kernels to time (default: every name but fma; see mla_cuda._ops.decode_kernel_names())")
    p.add_argument("--splits", nargs="+", type=int, default=[], metavar="N",
                   help="also time the automatic kernel with the flash-decoding split forced to N "
                        "(1-128): the study behind choose_num_splits in csrc/cuda/split_combine.cuh")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if any(not 1 <= n <= 128 for n in args.splits):
        p.error("--splits takes split counts from 1 to 128")
    if not torch.cuda.is_available():
        print("decode_configs.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mla_cuda._ops import decode_kernel_names

    names = args.kernels or [n for n in decode_kernel_names() if n != "fma"]
    unknown = sorted(set(names) - set(decode_kernel_names()))
    if unknown:
        print(f"decode_configs.py: unknown kernel {', '.join(unknown)}; known: {', '.join(decode_kernel_names())}",
              file=sys.stderr)
        return 2
    bw = kb.copy_bandwidth()
    rows = []
    for shape in args.shapes:
        for B, L in args.cases:
            rows.append(time_kernels(shape, B, L, names, args.splits))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(0), copy_GBps=bw, rows=rows), f, indent=1)
    print(markdown(rows, names + [f"splits={n}" for n in args.splits], bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
