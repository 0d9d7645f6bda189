#!/usr/bin/env python
"""Tokenizes a prefix of the training corpus once, for runs on a machine
that cannot see the shared data folder (the GPU machine): Wikipedia and
Gutenberg files interleaved, an EOS after each file, uint16 ids (the
vocabulary must fit) as .npy, which python/finetune.py --data reads
directly."""
import argparse
import glob
import os
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/pretokenize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the .npy file to write")
    p.add_argument("--tokens", type=int, default=24_000_000, help="stop after this many tokens")
    p.add_argument("--model", default=None, help="tokenizer source (default: SmolLM2-135M-Instruct)")
    args = p.parse_args()
    from mha2mla.shared_data import shared_path
    from mha2mla.source import load_tokenizer

    tok = load_tokenizer(args.model)
    if len(tok) > 65535:
        print("pretokenize.py: vocabulary does not fit uint16", file=sys.stderr)
        return 2
    wiki = sorted(glob.glob(os.path.join(shared_path("corpus"), "wikipedia_en_2015", "*")))
    books = sorted(glob.glob(os.path.join(shared_path("corpus"), "gutenberg", "*")))
    order = [f for pair in zip(wiki, books) for f in pair] + books[len(wiki):] + wiki[len(books):]
    parts, n = [], 0
    for f in order:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids = tok(fh.read())["input_ids"] + [tok.eos_token_id]
        parts.append(np.asarray(ids, dtype=np.uint16))
        n += len(ids)
        if n >= args.tokens:
            break
    arr = np.concatenate(parts)[: args.tokens]
    np.save(args.out, arr)
    print(f"{arr.size} tokens from {len(parts)} files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
