#!/usr/bin/env python
"""Study: what a quantized latent cache costs in perplexity, with and without
the latent rotation.

    python bench/studies/quantized_cache.py CHECKPOINT [CHECKPOINT ...] [--formats auto,fp8,int4,int4-g32]
        [--rotations none,hadamard,random] [--context 512] [--windows 8] [--out bench/results]

For every converted checkpoint, rotation and cache format: WikiText-2 test
perplexity scored through LatentKVCache the way generation computes logits
(a one-token prefill, then decode steps of --chunk tokens that read every
latent back from the cache: quantized as appended, dequantized by the
attention kernel), windows of --context tokens, --windows of them. A
rotation other than "none" is folded into the loaded weights first
(mha2mla.latent_rotation.rotate_latents, what convert.py --latent-rotation
does); a checkpoint converted with a rotation already is scored as it is
under "none". Also the cache's bytes per token and their share of the
original model's bf16 K/V. Writes quantized_cache_<card>.json and .md.
"""
import argparse
import copy
import os
import sys
import time

import torch

from mha2mla.cache import LatentKVCache
from mha2mla.checkpoint import load_mla_model
from mha2mla.evaluate_cli import display_name
from mha2mla.latent_rotation import rotate_latents
from mha2mla.modeling import kv_cache_bytes_per_token
from mha2mla.perplexity import perplexity_through_cache, tokenize_file
from mha2mla.results import save_results
from mha2mla.shared_data import wikitext2_test

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def markdown(res: dict) -> str:
    lines = [f"# Quantized latent cache: WikiText-2 perplexity through the cache ({res['card']}, {res['dtype']})", "",
             f"Context {res['context']} tokens, {res['tokens']:,} tokens scored per row, decode steps of "
             f"{res['chunk']} tokens over the cache; bytes per token over all layers (rope keys in the model dtype "
             "for the quantized formats; bf16 in the share).", "",
             "| checkpoint | rotation | cache | bytes/token | of original bf16 K/V | perplexity | vs 16-bit cache |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['checkpoint']} | {r['rotation']} | {r['cache']} | {r['bytes_per_token']:,} | "
                     f"{100 * r['share_of_original']:.2f}% | {r['ppl']:.3f} | {100 * (r['ppl_ratio'] - 1):+.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/studies/quantized_cache.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="converted model folders")
    p.add_argument("--formats", default="auto,fp8,int4,int4-g32", help="cache_dtype values (default: %(default)s)")
    p.add_argument("--rotations", default="none,hadamard", help="none, hadamard, random (default: %(default)s)")
    p.add_argument("--ppl-data", default=wikitext2_test(), metavar="FILE")
    p.add_argument("--context", type=int, default=512, metavar="TOKENS")
    p.add_argument("--windows", type=int, default=8, metavar="N", help="non-overlapping windows scored (default: 8)")
    p.add_argument("--chunk", type=int, default=64, metavar="TOKENS", help="tokens per decode step (default: 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--out", default=RESULTS, metavar="FOLDER")
    args = p.parse_args(argv)
    for path in args.checkpoints:
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"quantized_cache.py: {path} is not a converted checkpoint (no config.json)", file=sys.stderr)
            return 2
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    res = dict(card=card, dtype=str(dtype), context=args.context, chunk=args.chunk, windows=args.windows,
               ppl_data=os.path.abspath(args.ppl_data), rows=[], tokens=0)
    from transformers import AutoTokenizer

    for path in args.checkpoints:
        base = load_mla_model(path, dtype, args.device)
        ids = tokenize_file(AutoTokenizer.from_pretrained(path), args.ppl_data)
        original = kv_cache_bytes_per_token(base)["original"]
        name = display_name(path)  # a fine-tuning run's checkpoint as RUN/last
        for rotation in args.rotations.split(","):
            model = base if rotation == "none" else copy.deepcopy(base)
            rotate_latents(model, rotation)
            ref = None
            for fmt in args.formats.split(","):
                t = time.time()
                r = perplexity_through_cache(model, ids, args.context, args.context, args.windows, False,
                                             batch_size=args.batch_size, cache_dtype=fmt, chunk=args.chunk)
                ref = ref or r["ppl"]
                cache = LatentKVCache(model, cache_dtype=fmt)
                row = dict(checkpoint=name, rotation=rotation, cache=fmt, ppl=r["ppl"], ppl_ratio=r["ppl"] / ref,
                           tokens=r["tokens"], bytes_per_token=r["bytes_per_token"],
                           share_of_original=_bf16_bytes(cache, model) / original, seconds=time.time() - t)
                res["tokens"] = r["tokens"]
                res["rows"].append(row)
                print(f"{name} {rotation} {fmt}: ppl {r['ppl']:.3f} ({row['seconds']:.0f} s)", flush=True)
                save_results(args.out, "quantized_cache", card, res, markdown(res), echo=False)
            del model
    save_results(args.out, "quantized_cache", card, res, markdown(res))
    return 0


def _bf16_bytes(cache, model) -> int:
    """The cache's bytes per token with its rope keys (and a 16-bit latent)
    in bf16, what a served model stores."""
    from mha2mla.cache import bytes_per_token_by_format

    fmt = "bf16" if cache.cache_format is None else cache.cache_format
    return bytes_per_token_by_format(model, [fmt])[fmt]


if __name__ == "__main__":
    sys.exit(main())
