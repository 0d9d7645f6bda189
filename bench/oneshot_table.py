#!/usr/bin/env python
"""One-shot conversion table: many conversions of one model from one set of
calibration statistics, each scored by WikiText-2 test perplexity (sliding
window), with its KV cache size against the original's.

Token ids may be given pre-tokenized (.npy int arrays, see --save-ids), so
the run needs neither the corpus nor the tokenizer on the machine that runs
it. Writes oneshot_ppl_<card>.json and .md under --out (default
bench/results)."""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (label, options) in the order of the table
VARIANTS = [
    ("partial RoPE only (2norm, r=4), no truncation", dict(rope_strategy="2norm", d_kv=0, whiten=False)),
    ("d_kv=32 plain SVD (2norm)", dict(rope_strategy="2norm", d_kv=32, whiten=False)),
    ("d_kv=16 plain SVD (2norm)", dict(rope_strategy="2norm", d_kv=16, whiten=False)),
    ("d_kv=8 plain SVD (2norm)", dict(rope_strategy="2norm", d_kv=8, whiten=False)),
    ("d_kv=32 whitened SVD (2norm)", dict(rope_strategy="2norm", d_kv=32)),
    ("d_kv=16 whitened SVD (2norm)", dict(rope_strategy="2norm", d_kv=16)),
    ("d_kv=8 whitened SVD (2norm)", dict(rope_strategy="2norm", d_kv=8)),
    ("d_kv=32 whitened, rope high", dict(rope_strategy="high", d_kv=32)),
    ("d_kv=32 whitened, rope low", dict(rope_strategy="low", d_kv=32)),
    ("d_kv=32 whitened, rope uniform", dict(rope_strategy="uniform", d_kv=32)),
    ("d_kv=32 whitened, rope 2norm-global", dict(rope_strategy="2norm-global", d_kv=32)),
    ("d_kv=32 whitened, rope pca (RoRoPE)", dict(rope_strategy="pca", d_kv=32)),
    ("d_kv=32 whitened, rope pca, energy ranks", dict(rope_strategy="pca", d_kv=32, rank_allocation="energy")),
    ("d_kv=32 whitened, rope 2norm, energy ranks", dict(rope_strategy="2norm", d_kv=32, rank_allocation="energy")),
    ("d_kv=16 whitened, rope pca (RoRoPE)", dict(rope_strategy="pca", d_kv=16)),
    ("d_kv=8 whitened, rope pca (RoRoPE)", dict(rope_strategy="pca", d_kv=8)),
    ("partial RoPE only (pca, r=4), no truncation", dict(rope_strategy="pca", d_kv=0, whiten=False)),
]


def run(model, calib_ids: torch.Tensor, ppl_ids: torch.Tensor, out_dir: str, context=2048, stride=512,
        max_windows=0, variants=VARIANTS, progress=True, model_name="SmolLM2-135M-Instruct") -> dict:
    from mha2mla import ConversionOptions, convert_model
    from mha2mla.calibration import collect_statistics
    from mha2mla.modeling import kv_cache_bytes_per_token
    from mha2mla.perplexity import perplexity
    from mha2mla.results import save_results

    device = next(model.parameters()).device
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    res = dict(card=card, model=model_name, context=context, stride=stride, calib_seqs=list(calib_ids.shape), rows=[])
    t = time.time()
    base = perplexity(model, ppl_ids, context, stride, max_windows, progress, "ppl original")
    res["rows"].append(dict(label="original", ppl=base["ppl"], tokens=base["tokens"], kv_ratio=1.0, seconds=time.time() - t))
    res["tokens"] = base["tokens"]
    print(json.dumps(res["rows"][-1]), flush=True)
    t = time.time()
    stats = collect_statistics(model, calib_ids, progress=progress)
    res["calibration_seconds"] = time.time() - t
    for label, kw in variants:
        t = time.time()
        m = copy.deepcopy(model)
        convert_model(m, stats, ConversionOptions(**kw), progress=False)
        conv_s = time.time() - t
        p = perplexity(m, ppl_ids, context, stride, max_windows, progress, label[:30])
        row = dict(label=label, ppl=p["ppl"], kv_ratio=kv_cache_bytes_per_token(m)["ratio"], convert_seconds=conv_s,
                   seconds=time.time() - t, options=kw)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_results(out_dir, "oneshot_ppl", card, res, markdown(res))
    return res


def markdown(res: dict) -> str:
    lines = [
        f"# One-shot MHA2MLA conversion of {res.get('model', 'SmolLM2-135M-Instruct')}: WikiText-2 test perplexity ({res['card']})",
        "",
        f"Sliding window: context {res['context']}, stride {res['stride']}, {res['tokens']:,} tokens scored. "
        f"Calibration: {res['calib_seqs'][0]} sequences x {res['calib_seqs'][1]} tokens of the shared corpus. "
        "r = head_dim/16 rope frequencies per KV head everywhere.",
        "",
        "| conversion | KV cache vs original | perplexity |",
        "|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {100 * r['kv_ratio']:.2f}% | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/oneshot_table.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder / hub id / .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib-ids", default=None, help=".npy [N, S] calibration token ids (default: sample the shared corpus)")
    p.add_argument("--ppl-ids", default=None, help=".npy [T] WikiText-2 test token ids (default: tokenize wiki.test.raw)")
    p.add_argument("--max-windows", type=int, default=0, help="perplexity windows per model (0 = all)")
    p.add_argument("--out", default=RESULTS, help="directory for the results (default: bench/results)")
    p.add_argument("--save-ids", default=None, help="only tokenize: write calib.npy and wikitext.npy to this folder")
    args = p.parse_args(argv)
    from mha2mla.calibration import sample_sequences
    from mha2mla.corpus import default_corpus
    from mha2mla.perplexity import tokenize_file
    from mha2mla.shared_data import shared_path
    from mha2mla.source import load_source, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.save_ids:
        tok = load_tokenizer(args.model)
    else:
        model, tok, _ = load_source(args.model, torch.float32, device, with_tokenizer=not (args.calib_ids and args.ppl_ids))
    calib = (torch.from_numpy(np.load(args.calib_ids, allow_pickle=False)).long() if args.calib_ids
             else sample_sequences(tok, [default_corpus()], 64, 512, 0))
    ppl_ids = (torch.from_numpy(np.load(args.ppl_ids, allow_pickle=False)).long() if args.ppl_ids
               else tokenize_file(tok, shared_path("wikitext2", "wiki.test.raw")))
    if args.save_ids:
        os.makedirs(args.save_ids, exist_ok=True)
        np.save(os.path.join(args.save_ids, "calib.npy"), calib.int().numpy())
        np.save(os.path.join(args.save_ids, "wikitext.npy"), ppl_ids.int().numpy())
        return 0
    name = os.path.basename(args.model.rstrip("/")).replace(".gguf", "") if args.model else "SmolLM2-135M-Instruct"
    run(model, calib, ppl_ids, args.out, max_windows=args.max_windows, model_name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
