"""Training throughput of the original model and converted checkpoints on
the same card, by the same loop (fp32 master weights, bf16 autocast, AdamW,
random tokens): what issue #7's "at least 85% of the original" compares.
Usage: python scripts/train_throughput.py OUT.json SOURCE_GGUF [CKPT ...]"""
import json
import sys
import time

import torch

from mha2mla.checkpoint import load_mla_model
from mha2mla.source import load_source


def tokens_per_s(model, batch=16, seq=1024, steps=20, warmup=5) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device="cuda")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch * seq * steps / (time.perf_counter() - t0)


def main():
    out, gguf, *ckpts = sys.argv[1:]
    res = dict(card=torch.cuda.get_device_name(0), batch=16, seq=1024, rows=[])
    model, _, _ = load_source(gguf, torch.float32, "cuda", with_tokenizer=False)
    res["rows"].append(dict(model="original", tokens_per_s=tokens_per_s(model)))
    del model
    for path in ckpts:
        model = load_mla_model(path, torch.float32, "cuda")
        res["rows"].append(dict(model=path, tokens_per_s=tokens_per_s(model)))
        del model
    base = res["rows"][0]["tokens_per_s"]
    for r in res["rows"]:
        r["fraction_of_original"] = r["tokens_per_s"] / base
    print(json.dumps(res, indent=1))
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
