"""End-to-end decode benchmark: transformers `generate()` of an original
model (its own DynamicCache, SDPA) against converted models (LatentKVCache
over mla_cuda's kernels), on one card, in one process.

For each model, batch and context: a random prompt of `context` tokens per
sequence, `generate(max_new_tokens=1)` (prefill) and
`generate(max_new_tokens=1+N)`; decode tokens/s = batch * N / (difference).
Peak GPU memory is that of the longer call. Configurations whose cache would
not fit the memory budget are skipped and say so."""
import gc
import json
import time

import torch

from .results import save_results

NEW_TOKENS = 32


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def cache_bytes_per_token(model) -> int:
    from .modeling import kv_cache_bytes_per_token

    return int(kv_cache_bytes_per_token(model)["converted"])


def decode_speed(model, batch: int, context: int, converted: bool) -> dict:
    from .hf_cache import LatentKVCache

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=0)

    def gen(n):
        cache = LatentKVCache(model, initial_tokens=n + 16) if converted else None
        extra = dict(past_key_values=cache) if converted else {}
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **kw, **extra)

    gen(2)  # warm-up (kernels, allocator)
    t_prefill = _sync_time(lambda: gen(1))
    # Peak of this call only: tensors still referenced by garbage (an earlier
    # configuration's out-of-memory traceback holds its frames in a reference
    # cycle) would count otherwise; the H200 run before this collect showed
    # 66 GiB for batch 1 x 1k right after a 256 x 16k OOM.
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t_total = _sync_time(lambda: gen(1 + NEW_TOKENS))
    peak = torch.cuda.max_memory_allocated()
    return dict(batch=batch, context=context, decode_tokens_per_s=batch * NEW_TOKENS / max(t_total - t_prefill, 1e-9),
                prefill_s=t_prefill, peak_gib=peak / 2**30)


def measured(previous: dict, card: str) -> dict:
    """(model, batch, context) -> run of an earlier result on the same card."""
    if not previous or previous.get("card") != card or previous.get("new_tokens") != NEW_TOKENS:
        return {}
    return {(row["model"], r["batch"], r["context"]): r for row in previous["rows"] for r in row["runs"]
            if "decode_tokens_per_s" in r}


def run(models: dict, batches, contexts, out_dir: str = None, cache_budget_gib: float = 60.0, max_seconds: float = 300,
        label: str = "generate", previous: dict = None) -> dict:
    """models: name -> (model, converted?); max_seconds per model. Saves JSON +
    Markdown under out_dir (none: only returns the results, to merge with
    save()). `previous`: an earlier result (same card) whose measured runs are
    kept, not repeated, so an interrupted benchmark continues where it was."""
    card = torch.cuda.get_device_name(0)
    res = dict(card=card, torch=torch.__version__, new_tokens=NEW_TOKENS, cache_budget_gib=cache_budget_gib, rows=[])
    done = measured(previous, card)
    for name, (model, converted) in models.items():
        start = time.time()
        bpt = cache_bytes_per_token(model)
        row = dict(model=name, cache_bytes_per_token=bpt,
                   max_batch_at_4k=int(cache_budget_gib * 2**30 // (bpt * 4096)), runs=[])
        for context in contexts:
            for batch in batches:
                need = batch * (context + NEW_TOKENS + 16) * bpt / 2**30
                if (name, batch, context) in done:
                    row["runs"].append(done[(name, batch, context)])
                    continue
                if need > cache_budget_gib or time.time() - start > max_seconds:
                    why = "cache over budget" if need > cache_budget_gib else "time budget spent"
                    row["runs"].append(dict(batch=batch, context=context, skipped=why))
                    continue
                try:
                    r = decode_speed(model, batch, context, converted)
                except torch.OutOfMemoryError:
                    r = dict(batch=batch, context=context, skipped="out of memory")
                gc.collect()
                torch.cuda.empty_cache()
                row["runs"].append(r)
                print(json.dumps(dict(model=name, **r)), flush=True)
        res["rows"].append(row)
    if out_dir:
        save(res, out_dir, label)
    return res


def save(res: dict, out_dir: str, label: str = "generate") -> None:
    save_results(out_dir, label, res["card"], res, markdown(res))


def markdown(res: dict) -> str:
    lines = [f"# End-to-end decode with transformers generate() on {res['card']} (torch {res['torch']})", "",
             f"{res['new_tokens']} new tokens after a random prompt; decode tokens/s over all sequences "
             f"(prefill excluded); peak GPU memory of the whole call. Largest batch at 4k context: "
             f"{res['cache_budget_gib']:.0f} GiB of KV cache divided by the cache bytes of 4096 tokens.", "",
             "| model | cache bytes/token | largest batch at 4k | batch | context | decode tok/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        for r in row["runs"]:
            speed = r.get("skipped") or f"{r['decode_tokens_per_s']:.0f}"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            lines.append(f"| {row['model']} | {row['cache_bytes_per_token']} | {row['max_batch_at_4k']} | {r['batch']} "
                         f"| {r['context']} | {speed} | {peak} |")
    return "\n".join(lines) + "\n"
