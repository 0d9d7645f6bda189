"""Device-side driver of the end-to-end generate() benchmark (issue #5):
SmolLM2-135M real weights (original and converted checkpoints given on the
command line) and Llama-2-7B shapes with random weights (original, and
converted at the given d_kv), all in bf16 on one GPU.
Usage: python scripts/e2e_bench.py OUT_DIR SOURCE CKPT_DKV32 CKPT_DKV16 [PREVIOUS_JSON]
(SOURCE: the .gguf or its exported folder; PREVIOUS_JSON: an earlier result
on the same card whose measured rows are kept, not repeated)"""
import gc
import json
import sys

import torch

from mha2mla.checkpoint import load_mla_model
from mha2mla.converter import install_empty_mla
from mha2mla.generate_bench import measured, run, save
from mha2mla.source import load_source


def llama7b(d_kv=None, r=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if d_kv:
        install_empty_mla(model, {"latent_dims": [32 * d_kv] * 32, "rope_pairs": 32 * r})
        model.to("cuda", torch.bfloat16)
        for layer in model.model.layers:
            a = layer.self_attn
            for prm in a.parameters():
                torch.nn.init.normal_(prm, std=0.02)
            a.inv_freq = 1.0 / 10000 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float32) / 128)
            a.rope_freq_idx = torch.arange(32 * r, device="cuda").view(1, -1) % 64
    return model.eval()


def main():
    out, gguf, dkv32, dkv16 = sys.argv[1:5]
    previous = json.load(open(sys.argv[5])) if len(sys.argv) > 5 else None
    smol, _, _ = load_source(gguf, torch.bfloat16, "cuda", with_tokenizer=False)
    models = {"SmolLM2-135M original": (smol.eval(), False)}
    for name, path in (("SmolLM2-135M d_kv=32", dkv32), ("SmolLM2-135M d_kv=16", dkv16)):
        models[name] = (load_mla_model(path, torch.bfloat16, "cuda"), True)
    res = run(models, [1, 16, 64, 256], [1024, 4096, 16384], max_seconds=60, previous=previous)
    save(res, out)
    del models, smol
    gc.collect()
    torch.cuda.empty_cache()
    kept = measured(previous, res["card"])
    for name, d_kv in (("Llama-2-7B shape original", None), ("Llama-2-7B shape d_kv=32", 32),
                       ("Llama-2-7B shape d_kv=16", 16)):
        if all((name, b, c) in kept for b in (1, 16) for c in (1024, 4096)):  # nothing to measure: no 7B to build
            res["rows"] += [row for row in previous["rows"] if row["model"] == name]
            continue
        m = llama7b(d_kv)
        res["rows"] += run({name: (m, d_kv is not None)}, [1, 16], [1024, 4096], max_seconds=20, previous=previous)["rows"]
        save(res, out)
        del m
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
