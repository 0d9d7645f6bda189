#!/usr/bin/env python
"""One-shot perplexity table of many conversions of the default model (or
--model). Token ids may be given pre-tokenized (.npy int arrays), so the run
needs neither the corpus nor the tokenizer on the machine that runs it."""
import argparse
import os
import sys

import numpy as np
import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir / hub id / .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib-ids", default=None, help=".npy [N, S] calibration token ids (default: sample the shared corpus)")
    p.add_argument("--ppl-ids", default=None, help=".npy [T] WikiText-2 test token ids (default: tokenize wiki.test.raw)")
    p.add_argument("--max-windows", type=int, default=0, help="perplexity windows per model (0 = all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results"))
    p.add_argument("--save-ids", default=None, help="only tokenize: write calib.npy and wikitext.npy to this folder")
    args = p.parse_args()
    from mha2mla.calibration import default_corpus, sample_sequences
    from mha2mla.convert_cli import WIKITEXT
    from mha2mla.oneshot import run
    from mha2mla.perplexity import tokenize_file
    from mha2mla.source import load_source

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = load_source(args.model, torch.float32, device)
    calib = (torch.from_numpy(np.load(args.calib_ids, allow_pickle=False)).long() if args.calib_ids
             else sample_sequences(tok, [default_corpus()], 64, 512, 0))
    ppl_ids = (torch.from_numpy(np.load(args.ppl_ids, allow_pickle=False)).long() if args.ppl_ids
               else tokenize_file(tok, WIKITEXT))
    if args.save_ids:
        os.makedirs(args.save_ids, exist_ok=True)
        np.save(os.path.join(args.save_ids, "calib.npy"), calib.int().numpy())
        np.save(os.path.join(args.save_ids, "wikitext.npy"), ppl_ids.int().numpy())
        return 0
    run(model, calib, ppl_ids, args.out, max_windows=args.max_windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
