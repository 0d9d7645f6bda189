#!/usr/bin/env python
"""Benchmarks. `python python/benchmark.py kernels [--out DIR]` times the
mla_cuda ops against PyTorch baselines on the current GPU and writes JSON +
Markdown (named after the card) under bench/results/."""
import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels", help="decode attention, cache append and partial RoPE against baselines")
    k.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results"),
                   help="directory for the JSON and Markdown results")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmark.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.what == "kernels":
        from mha2mla.kernel_bench import run

        run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
