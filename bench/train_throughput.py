#!/usr/bin/env python
"""Training throughput of the original model and converted checkpoints on
one GPU, by the same loop: float32 master weights, bf16 autocast, fused
AdamW, gradient clipping, random tokens. Tokens/s after a warm-up, and each
model's fraction of the original's.

Writes train_throughput_<card>.json and .md under --out (default
bench/results)."""
import argparse
import os
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def tokens_per_s(model, batch=16, seq=1024, steps=20, warmup=5) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device="cuda")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch * seq * steps / (time.perf_counter() - t_start)


def markdown(res: dict) -> str:
    lines = [f"# Training throughput on {res['card']}", "",
             f"Batch {res['batch']} x {res['seq']} tokens, float32 weights, bf16 autocast, fused AdamW, clip 1.0, "
             f"random tokens; {res['steps']} steps after a warm-up.", "",
             "| model | tokens/s | vs original |", "|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['tokens_per_s']:,.0f} | {100 * r['fraction_of_original']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/train_throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="converted checkpoints to compare with the original")
    p.add_argument("--source", default=None, help="the original: HF folder, hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=RESULTS, help="directory for the results (default: bench/results)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/train_throughput.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mha2mla import load_mla_model
    from mha2mla.results import save_results
    from mha2mla.source import load_source

    res = dict(card=torch.cuda.get_device_name(0), batch=args.batch, seq=args.seq, steps=args.steps, rows=[])
    model, _, _ = load_source(args.source, torch.float32, "cuda", with_tokenizer=False)
    res["rows"].append(dict(model="original", tokens_per_s=tokens_per_s(model, args.batch, args.seq, args.steps)))
    del model
    for path in args.checkpoints:
        model = load_mla_model(path, torch.float32, "cuda")
        res["rows"].append(dict(model=path, tokens_per_s=tokens_per_s(model, args.batch, args.seq, args.steps)))
        del model
        torch.cuda.empty_cache()
    base = res["rows"][0]["tokens_per_s"]
    for r in res["rows"]:
        r["fraction_of_original"] = r["tokens_per_s"] / base
    save_results(args.out, "train_throughput", res["card"], res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
