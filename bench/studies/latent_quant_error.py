#!/usr/bin/env python
"""Study: how much of the cached latent each quantized cache format loses,
measured where the model reads it.

    python bench/studies/latent_quant_error.py CHECKPOINT [CHECKPOINT ...] [--formats fp8,int4,int4-g32]
        [--rotations none,hadamard] [--context 512] [--windows 4] [--out bench/results]

For every converted checkpoint: the latents c = kv_down x of --windows
non-overlapping WikiText-2 test windows (every layer), written by the
quantizing append op into a cache of each format, read back from the cache
rows' bytes (codes times their scales, in mla_cuda.cache_format's layout),
and compared where attention uses them: the relative squared error of the
keys without RoPE (k_up c) and of the values (v_up c), summed over tokens
and layers. A rotation other than "none" turns c before quantization and
back after, as folding it into the weights does. Perplexity through the
cache (bench/studies/quantized_cache.py) says what an error costs; this
says, in seconds and without a GPU, which format errs least for its bytes.
Writes latent_quant_error_<card>.json and .md.
"""
import argparse
import os
import sys

import numpy as np
import torch

import mla_cuda
from mha2mla.checkpoint import load_mla_model
from mha2mla.evaluate_cli import display_name
from mha2mla.latent_rotation import KINDS as ROTATIONS
from mha2mla.latent_rotation import rotation_matrix
from mha2mla.modeling import MLAAttention
from mha2mla.perplexity import tokenize_file
from mha2mla.results import save_results
from mha2mla.shared_data import wikitext2_test
from mla_cuda.cache_format import is_quantized, quantized_row_layout

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
BLOCK = 64  # tokens per cache block


def dequantized_latents(rows: torch.Tensor, cache_format: str, R: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The latents [N, R] float32 that the uint8 cache rows [N, row_bytes]
    hold: fp8 codes or int4 codes (two a byte, low nibble the even channel,
    two's complement) times the float32 scale of their group."""
    lay = quantized_row_layout(cache_format, R, rope_dim, dtype)
    codes = rows[:, :lay.code_bytes].contiguous()
    if lay.kind == "fp8":
        values = codes.view(torch.float8_e4m3fn).float()
    else:
        nibbles = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(1).to(torch.int16)
        values = torch.where(nibbles >= 8, nibbles - 16, nibbles).float()
    scales = rows[:, lay.scale_offset:lay.scale_offset + 4 * lay.num_scales].contiguous().view(torch.float32)
    return values * scales.repeat_interleave(lay.group, dim=1)


def through_cache(c: torch.Tensor, cache_format: str, rope_dim: int) -> torch.Tensor:
    """c [N, R] written into a cache of cache_format by the append op, read back."""
    N, R = c.shape
    row_bytes = quantized_row_layout(cache_format, R, rope_dim, c.dtype).row_bytes
    cache = torch.zeros(-(-N // BLOCK), BLOCK, row_bytes, dtype=torch.uint8, device=c.device)
    rope = torch.zeros(N, 1, rope_dim, dtype=c.dtype, device=c.device)
    mla_cuda.latent_cache_append(c.contiguous(), rope, cache, torch.arange(N, device=c.device), cache_format=cache_format)
    return dequantized_latents(cache.view(-1, row_bytes)[:N], cache_format, R, rope_dim, c.dtype)


def latents_of(model, ids: torch.Tensor, context: int, windows: int) -> dict:
    """{attention module: its latents [windows * context, R] float32}."""
    attns = [m for m in model.modules() if isinstance(m, MLAAttention)]
    lat = {a: [] for a in attns}
    hooks = [a.kv_down.register_forward_hook(lambda mod, inp, out, a=a: lat[a].append(out.reshape(-1, out.shape[-1]).float()))
             for a in attns]
    try:
        with torch.no_grad():
            for w in range(windows):
                model(ids[w * context:(w + 1) * context][None].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {a: torch.cat(v) for a, v in lat.items()}


def errors(lat: dict, cache_format: str, rotation: str) -> dict:
    """Relative squared errors of k_up c and v_up c over all layers."""
    sums = dict(dk=0.0, k=0.0, dv=0.0, v=0.0)
    for a, c in lat.items():
        turn = None if rotation == "none" else rotation_matrix(rotation, c.shape[1]).to(c)
        cr = c if turn is None else c @ turn.T  # each row c turned to H c, as the conversion turns the latent
        d = through_cache(cr, cache_format, 2 * a.rope_pairs) - cr
        if turn is not None:
            d = d @ turn  # the error turned back: H^T d
        k_up, v_up = a.k_up.detach().float(), a.v_up.weight.detach().float()
        sums["dk"] += torch.einsum("gdr,tr->tgd", k_up, d).pow(2).sum().item()
        sums["k"] += torch.einsum("gdr,tr->tgd", k_up, c).pow(2).sum().item()
        sums["dv"] += (d @ v_up.T).pow(2).sum().item()
        sums["v"] += (c @ v_up.T).pow(2).sum().item()
    return dict(k_rel_mse=sums["dk"] / sums["k"], v_rel_mse=sums["dv"] / sums["v"])


def markdown(res: dict) -> str:
    head = ["checkpoint", "rotation", "cache", "bytes/row", "K rel. error", "V rel. error", "K change", "V change"]
    table = [head, ["---"] * len(head)] + [
        [r["checkpoint"], r["rotation"], r["cache"], str(r["row_bytes"]), f"{r['k_rel_mse']:.2e}", f"{r['v_rel_mse']:.2e}",
         f"{100 * (r['k_ratio'] - 1):+.0f}%", f"{100 * (r['v_ratio'] - 1):+.0f}%"] for r in res["rows"]]
    return "\n".join([
        f"# Quantized latent caches: what the latent loses, in key and value space ({res['card']})", "",
        f"Latents of {res['windows']} windows of {res['context']} tokens of {os.path.basename(res['text'])}, every "
        "layer, written by the quantizing append op and read back from the cache's bytes; relative squared error of "
        "the keys without RoPE (k_up c) and of the values (v_up c), summed over tokens and layers. Changes are "
        "against the same checkpoint's first format without rotation. Bytes: one layer's cache row, rope keys in "
        "bf16.", ""] + ["| " + " | ".join(cells) + " |" for cells in table]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/studies/latent_quant_error.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="converted model folders")
    p.add_argument("--formats", default="int4,int4-g32,int4-g24,int4-g16,fp8",
                   help="quantized cache formats; changes are against the first; a format whose groups do not divide "
                   "a checkpoint's latent is skipped for it (default: %(default)s)")
    p.add_argument("--rotations", default="none,hadamard", help="none, hadamard, random (default: %(default)s)")
    p.add_argument("--text", default=None, metavar="FILE", help="text whose latents are measured (default: WikiText-2 test)")
    p.add_argument("--tokens", default=None, metavar="NPY", help="token ids (.npy, bench/pretokenize.py) instead of --text")
    p.add_argument("--context", type=int, default=512, metavar="TOKENS")
    p.add_argument("--windows", type=int, default=4, metavar="N")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model and the append op run")
    p.add_argument("--out", default=RESULTS, metavar="FOLDER")
    args = p.parse_args(argv)
    formats = args.formats.split(",")
    bad = [f for f in formats if not is_quantized(f)]
    if bad:
        print(f"latent_quant_error.py: {', '.join(bad)}: not a quantized cache format (fp8, int4, fp8-g<N>, int4-g<N>)",
              file=sys.stderr)
        return 2
    rotations = args.rotations.split(",")
    if not set(rotations) <= set(ROTATIONS):
        print(f"latent_quant_error.py: --rotations {args.rotations}: use {', '.join(ROTATIONS)}", file=sys.stderr)
        return 2
    for path in args.checkpoints:
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"latent_quant_error.py: {path} is not a converted checkpoint (no config.json)", file=sys.stderr)
            return 2
    text = args.tokens or args.text or wikitext2_test()
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    res = dict(card=card, context=args.context, windows=args.windows, text=os.path.abspath(text), rows=[])
    from transformers import AutoTokenizer

    for path in args.checkpoints:
        model = load_mla_model(path, torch.float32, args.device)
        ids = (torch.from_numpy(np.load(args.tokens).astype(np.int64)) if args.tokens
               else tokenize_file(AutoTokenizer.from_pretrained(path), text))
        if ids.numel() < args.context * args.windows:
            print(f"latent_quant_error.py: {text} has {ids.numel()} tokens, fewer than {args.windows} windows of "
                  f"{args.context}", file=sys.stderr)
            return 2
        lat = latents_of(model, ids, args.context, args.windows)
        a = next(iter(lat))
        fits = []  # the formats whose groups divide this checkpoint's latent
        for fmt in formats:
            try:
                fits.append((fmt, quantized_row_layout(fmt, a.latent_dim, 2 * a.rope_pairs, torch.bfloat16).row_bytes))
            except ValueError as err:
                print(f"latent_quant_error.py: {display_name(path)}: skipping {fmt}: {err}", file=sys.stderr)
        first = None
        for rotation in rotations:
            for fmt, row_bytes in fits:
                e = errors(lat, fmt, rotation)
                first = first or e
                row = dict(checkpoint=display_name(path), rotation=rotation, cache=fmt, row_bytes=row_bytes,
                           k_ratio=e["k_rel_mse"] / first["k_rel_mse"], v_ratio=e["v_rel_mse"] / first["v_rel_mse"], **e)
                res["rows"].append(row)
                print(f"{row['checkpoint']} {rotation} {fmt}: K {e['k_rel_mse']:.2e} V {e['v_rel_mse']:.2e}", flush=True)
    path = save_results(args.out, "latent_quant_error", card, res, markdown(res))
    print(f"wrote {path}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
