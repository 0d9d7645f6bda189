#!/usr/bin/env python
"""What a quantized latent cache costs in quality: converted checkpoints
scored through 16-bit, fp8 and int4 latent caches, each against the same
checkpoint's 16-bit cache.

    python bench/quantized_quality.py CHECKPOINT [CHECKPOINT ...] [--formats auto,fp8,int4] [--limit 600]
        [--long-contexts 4096,8192] [--rotations none,hadamard] [--original SOURCE] [--work DIR] [--out DIR]
    python bench/quantized_quality.py --tabulate --work DIR [--out DIR]

Every score goes through LatentKVCache the way generation computes logits:
a one-token prefill, then decode steps of 64 tokens that read every latent
back from the cache (quantized as appended, dequantized by the attention
kernel). Three measurements, each resumable, kept under --work:

  ev_<format>/       python/evaluate.py --cache-dtype <format>: WikiText-2
                     test perplexity (sliding windows of 2048, stride 512)
                     and the six zero-shot tasks, --limit items per task
                     (the same random sample for every format)
  long<context>/     bench/studies/quantized_cache.py: perplexity over the
                     first --long-windows non-overlapping windows of
                     <context> tokens, with and without each --rotations
  ev_original/, original<context>/
                     with --original: the source model on the same items
                     and windows, full forwards over its own K/V, as a
                     reference

The table, quantized_quality_<card>.json and .md under --out, gives for
every checkpoint and format the bytes per token, perplexity and six-task
average and their differences to the 16-bit cache (the average's with its
paired standard error: both rows answered the same items).
"""
import argparse
import glob
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SIXTEEN_BIT = "auto"  # the cache format every other one is compared with


def _load_json(pattern: str):
    """The one JSON file matching pattern, or None."""
    files = sorted(glob.glob(pattern))
    if len(files) > 1:
        raise ValueError(f"{len(files)} results match {pattern}; keep one card's results in a work folder")
    if not files:
        return None
    with open(files[0]) as f:
        return json.load(f)


def _checkpoint_name(model_id: str) -> str:
    """A row's checkpoint: evaluate.py names rows 'PATH [fmt cache]'."""
    from mha2mla.evaluate_cli import display_name

    return display_name(model_id.split(" [")[0])


def _run_study(argv) -> int:
    """bench/studies/quantized_cache.py, in this process."""
    spec = importlib.util.spec_from_file_location("quantized_cache_study", os.path.join(HERE, "studies",
                                                                                       "quantized_cache.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study.main(argv)


def plan(args, formats, contexts) -> list:
    """The steps (what, function, argv) of a run: evaluate.py resumes by
    itself; a long context whose study holds every row is left out."""
    from mha2mla.evaluate_cli import main as evaluate

    common = ["--limit", str(args.limit), "--batch-size", str(args.batch_size), "--device", args.device, "--resume"]
    common += ["--tasks", args.tasks] if args.tasks else []
    common += ["--data", args.data] if args.data else []
    common += ["--ppl-data", args.ppl_data] if args.ppl_data else []
    common += ["--quiet"] if args.quiet else []
    steps = [(f"{fmt} cache", evaluate, [*args.checkpoints, "--cache-dtype", fmt, *common,
                                         "--out", os.path.join(args.work, f"ev_{fmt}")]) for fmt in formats]
    if args.original:
        steps.append(("original", evaluate, ["original", "--source", args.original, *common,
                                             "--out", os.path.join(args.work, "ev_original")]))
    study_device = args.device
    if study_device == "auto":  # the study takes a torch device
        import torch

        study_device = "cuda" if torch.cuda.is_available() else "cpu"
    for c in contexts:
        long = ["--context", str(c), "--windows", str(args.long_windows), "--device", study_device]
        long += ["--ppl-data", args.ppl_data] if args.ppl_data else []
        out = os.path.join(args.work, f"long{c}")
        done = _load_json(os.path.join(out, "quantized_cache_*.json"))
        want = len(args.checkpoints) * len(formats) * len(args.rotations.split(","))
        if done is None or len(done["rows"]) < want:  # the study writes after every row but starts over
            steps.append((f"{c}-token windows", _run_study, [*args.checkpoints, "--formats", ",".join(formats),
                                                               "--rotations", args.rotations, *long, "--out", out]))
        if args.original:
            steps.append((f"original, {c}-token windows", evaluate,
                          ["original", "--source", args.original, "--tasks", "wikitext", "--limit",
                           str(args.long_windows), "--ppl-context", str(c), "--ppl-stride", str(c), "--resume",
                           "--device", args.device, *(["--ppl-data", args.ppl_data] if args.ppl_data else []),
                           "--out", os.path.join(args.work, f"original{c}")]))
    return steps


def measure(steps) -> int:
    """Runs the steps; returns the first failing exit code, or 0."""
    for i, (what, run, argv) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {what}", flush=True)
        rc = run(argv)
        if rc:
            print(f"quantized_quality.py: step '{what}' failed (exit {rc}); run again to resume", file=sys.stderr)
            return rc
    return 0


def tabulate(work: str) -> dict:
    """The table's data from the results under `work` (ValueError when it
    holds none)."""
    from mha2mla.evaluation import paired_difference, six_task_average

    evals = {}
    for path in sorted(glob.glob(os.path.join(work, "ev_*", "evaluation_*.json"))):
        fmt = os.path.basename(os.path.dirname(path))[3:]
        evals[fmt] = _load_json(path)
    if not evals:
        raise ValueError(f"no results under {work}: no ev_<format>/evaluation_<card>.json")
    original = evals.pop("original", None)
    formats = sorted(evals, key=lambda f: (f != SIXTEEN_BIT, f))
    card = next(iter(evals.values()))["card"]
    res = dict(card=card, dtype=next(iter(evals.values())).get("dtype"), limit=next(iter(evals.values())).get("limit"),
               rows=[], long=[], original=None)
    by_ckpt = {}
    for fmt in formats:
        for m in evals[fmt]["models"]:
            by_ckpt.setdefault(_checkpoint_name(m["model"]), {})[fmt] = m
    for name, rows in by_ckpt.items():
        base = rows.get(SIXTEEN_BIT)
        for fmt in formats:
            m = rows.get(fmt)
            if m is None:
                continue
            s = m["scores"]
            ppl = s.get("wikitext", {}).get("ppl")
            base_ppl = base["scores"].get("wikitext", {}).get("ppl") if base else None
            row = dict(checkpoint=name, cache=fmt, bytes_per_token=m.get("kv_bytes_per_token"), ppl=ppl,
                       ppl_ratio=ppl / base_ppl if ppl and base_ppl else None, avg=None, diff=None, se=None)
            try:
                row["avg"] = six_task_average(s)
                if base and fmt != SIXTEEN_BIT:
                    row["diff"], row["se"] = paired_difference(s, base["scores"])
            except (ValueError, KeyError):  # tasks missing (a run cut short, or --tasks wikitext)
                pass
            res["rows"].append(row)
            w = s.get("wikitext")
            if w and "windows" in w:
                res.setdefault("wikitext", dict(context=w.get("context"), stride=w.get("stride"), windows=w["windows"]))
    if original:
        (m,) = original["models"]
        s = m["scores"]
        res["original"] = dict(model=_checkpoint_name(m["model"]), bytes_per_token=m.get("kv_bytes_per_token"),
                               ppl=s.get("wikitext", {}).get("ppl"), avg=_safe_avg(s, six_task_average), long={})
    contexts = sorted(int(os.path.basename(d)[4:]) for d in glob.glob(os.path.join(work, "long*"))
                      if os.path.basename(d)[4:].isdigit())
    for c in contexts:
        study = _load_json(os.path.join(work, f"long{c}", "quantized_cache_*.json"))
        for r in (study or {}).get("rows", []):
            res["long"].append(dict(context=c, checkpoint=r["checkpoint"], rotation=r["rotation"], cache=r["cache"],
                                    ppl=r["ppl"], ppl_ratio=r["ppl_ratio"], windows=study.get("tokens")))
        ref = _load_json(os.path.join(work, f"original{c}", "evaluation_*.json"))
        if ref and res["original"] is not None:
            res["original"]["long"][c] = ref["models"][0]["scores"].get("wikitext", {}).get("ppl")
    return res


def _safe_avg(scores, six_task_average):
    try:
        return six_task_average(scores)
    except (ValueError, KeyError):
        return None


def _num(x, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    limit = f"{res['limit']} items per task, the same random sample for every row" if res.get("limit") else "all items"
    w = res.get("wikitext") or {}
    windows = f"sliding windows of {w['context']} tokens, stride {w['stride']} ({w['windows']} windows)" if w else "-"
    lines = [f"# Quality through quantized latent caches ({res['card']}, {res['dtype']})", "",
             "Every score goes through LatentKVCache as generation computes logits: a one-token prefill, then "
             "decode steps of 64 tokens that read the latents back from the cache (quantized as appended, "
             "dequantized by the attention kernel). WikiText-2: test perplexity, "
             f"{windows}. Six-task average: the paper's Table 1 average, {limit}. Differences are to the same "
             "checkpoint's 16-bit cache; the average's with its paired standard error. Bytes per token: the "
             f"cache's, all layers, 16-bit rows and rope keys in {res['dtype']}.", "",
             "| checkpoint | cache | bytes/token | WikiText-2 ppl | vs 16-bit cache | 6-task avg | vs 16-bit cache "
             "(paired SE) |", "|---|---|---|---|---|---|---|"]
    o = res.get("original")
    if o:
        lines.append(f"| original | its K/V, bf16 | {_num(o['bytes_per_token'], ',')} | "
                     f"{_num(o['ppl'], '.2f')} | | {_num(o['avg'], '.2f')} | |")
    for r in res["rows"]:
        cache = "16-bit" if r["cache"] == SIXTEEN_BIT else r["cache"]
        ratio = "" if r["cache"] == SIXTEEN_BIT or r["ppl_ratio"] is None else f"{100 * (r['ppl_ratio'] - 1):+.2f}%"
        diff = "" if r["diff"] is None else f"{r['diff']:+.2f} ({r['se']:.2f})"
        lines.append(f"| {r['checkpoint']} | {cache} | {_num(r['bytes_per_token'], ',')} | {_num(r['ppl'], '.2f')} | "
                     f"{ratio} | {_num(r['avg'], '.2f')} | {diff} |")
    contexts = sorted({r["context"] for r in res["long"]})
    if contexts:
        head = " | ".join(f"ppl, {c}-token windows | vs 16-bit cache" for c in contexts)
        lines += ["", "Long contexts: perplexity over the first non-overlapping windows of WikiText-2 test "
                  "(the same windows for every row); rotation: the latent rotation folded into the weights at "
                  "load (exact in 16 bits), which spreads channel variance before quantization.", "",
                  f"| checkpoint | rotation | cache | {head} |", "|---|---|---|" + "---|---|" * len(contexts)]
        if o and o.get("long"):
            cells = " | ".join(f"{_num(o['long'].get(c), '.2f')} | " for c in contexts)
            lines.append(f"| original | - | its K/V | {cells}|")
        keys = []
        for r in res["long"]:
            k = (r["checkpoint"], r["rotation"], r["cache"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            cells = []
            for c in contexts:
                r = next((x for x in res["long"] if x["context"] == c and (x["checkpoint"], x["rotation"], x["cache"]) == k),
                         None)
                rel = "" if r is None or k[2] == SIXTEEN_BIT else f"{100 * (r['ppl_ratio'] - 1):+.2f}%"
                cells.append(f"{_num(r and r['ppl'], '.2f')} | {rel}")
            cache = "16-bit" if k[2] == SIXTEEN_BIT else k[2]
            lines.append(f"| {k[0]} | {k[1]} | {cache} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python bench/quantized_quality.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="converted model folders")
    ap.add_argument("--formats", default="auto,fp8,int4",
                    help="cache formats: auto (16-bit, the reference, always measured), fp8, int4, int4-g<N> "
                    "(default: %(default)s)")
    ap.add_argument("--limit", type=int, default=600, help="items per task; 0 = all (default: %(default)s)")
    ap.add_argument("--tasks", help="evaluate.py --tasks (default: WikiText-2 and the six tasks)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default: %(default)s)")
    ap.add_argument("--long-contexts", default="4096,8192", metavar="TOKENS,...",
                    help="window lengths of the long-context perplexity; '' = none (default: %(default)s)")
    ap.add_argument("--long-windows", type=int, default=8, help="windows per long context (default: %(default)s)")
    ap.add_argument("--rotations", default="none,hadamard", help="for the long contexts (default: %(default)s)")
    ap.add_argument("--original", metavar="SOURCE", help="also score the source model (folder, hub id or .gguf)")
    ap.add_argument("--data", help="evaluate.py --data: folder of the multiple-choice data")
    ap.add_argument("--ppl-data", help="text file of the perplexities (default: WikiText-2 test)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    ap.add_argument("--work", default="quantized_quality", metavar="DIR",
                    help="folder of the measurements; a second run keeps what is there (default: %(default)s)")
    ap.add_argument("--tabulate", action="store_true", help="only build the table from --work")
    ap.add_argument("--out", default=RESULTS, metavar="DIR", help="folder of the table (default: bench/results)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if SIXTEEN_BIT not in formats:
        formats.insert(0, SIXTEEN_BIT)
    try:
        contexts = [int(c) for c in args.long_contexts.split(",") if c]
    except ValueError:
        print(f"quantized_quality.py: --long-contexts takes numbers of tokens, not {args.long_contexts!r}",
              file=sys.stderr)
        return 2
    if not args.tabulate:
        if not args.checkpoints:
            print("quantized_quality.py: give converted checkpoint folders (or --tabulate with --work)",
                  file=sys.stderr)
            return 2
        from mla_cuda.cache_format import is_quantized

        bad = [f for f in formats if f != SIXTEEN_BIT and not is_quantized(f)]
        if bad:
            print(f"quantized_quality.py: --formats {','.join(bad)}: use auto, fp8, int4, int4-g<N> or fp8-g<N>",
                  file=sys.stderr)
            return 2
        for path in args.checkpoints:
            if not os.path.isfile(os.path.join(path, "config.json")):
                print(f"quantized_quality.py: {path} is not a converted checkpoint (no config.json)", file=sys.stderr)
                return 2
        rc = measure(plan(args, formats, contexts))
        if rc:
            return rc
    from mha2mla.results import save_results

    try:
        res = tabulate(args.work)
    except ValueError as e:
        print(f"quantized_quality.py: {e}", file=sys.stderr)
        return 2
    save_results(args.out, "quantized_quality", res["card"], res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
