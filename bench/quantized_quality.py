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
kernel). Three measurements, each resumable, kept under --work (one card's
results a folder):

  ev_<format>/       python/evaluate.py --cache-dtype <format>: WikiText-2
                     test perplexity (sliding windows of 2048, stride 512,
                     at most --limit of them) and the six zero-shot tasks,
                     --limit items per task (the same random sample for
                     every format)
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


def _load_json(folder: str, stem: str):
    """The one <stem>_<card>.json in folder, or None; ValueError when the
    folder holds results of more than one card."""
    files = sorted(glob.glob(os.path.join(folder, f"{stem}_*.json")))
    if len(files) > 1:
        raise ValueError(f"{folder} holds results of {len(files)} cards; keep one card's results in a work folder")
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


def _study_done(study, names, formats, rotations, context, windows, ppl_data) -> bool:
    """Whether a long-context study holds every row this run asks for, over
    the same windows of the same text."""
    if study is None or study.get("context") != context or study.get("windows") != windows:
        return False
    if ppl_data is not None and study.get("ppl_data") != os.path.abspath(ppl_data):
        return False
    have = {(r["checkpoint"], r["rotation"], r["cache"]) for r in study["rows"]}
    return all((n, rot, f) in have for n in names for rot in rotations for f in formats)


def plan(args, formats, contexts) -> list:
    """The steps (what, function, argv) of a run: evaluate.py resumes by
    itself (--resume); a long context whose study already holds every row
    asked for is left out. ValueError when --work mixes cards."""
    from mha2mla.evaluate_cli import display_name
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
    names = [display_name(p) for p in args.checkpoints]
    rotations = args.rotations.split(",")
    ppl_data = ["--ppl-data", args.ppl_data] if args.ppl_data else []
    for c in contexts:
        out = os.path.join(args.work, f"long{c}")
        if not _study_done(_load_json(out, "quantized_cache"), names, formats, rotations, c, args.long_windows,
                           args.ppl_data):  # the study writes after every row, but a run starts over
            steps.append((f"{c}-token windows", _run_study,
                          [*args.checkpoints, "--formats", ",".join(formats), "--rotations", args.rotations,
                           "--context", str(c), "--windows", str(args.long_windows), "--device", study_device,
                           *ppl_data, "--out", out]))
        if args.original:
            steps.append((f"original, {c}-token windows", evaluate,
                          ["original", "--source", args.original, "--tasks", "wikitext", "--limit",
                           str(args.long_windows), "--ppl-context", str(c), "--ppl-stride", str(c), "--resume",
                           "--device", args.device, *ppl_data, "--out", os.path.join(args.work, f"original{c}")]))
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
    holds no results of a cache format, or results that do not belong
    together)."""
    from mha2mla.evaluation import paired_difference, six_task_average

    evals = {}
    for folder in sorted(glob.glob(os.path.join(work, "ev_*"))):
        res = _load_json(folder, "evaluation")
        if res is not None:
            evals[os.path.basename(folder)[3:]] = res
    original = evals.pop("original", None)
    if not evals:
        raise ValueError(f"no results under {work}: no ev_<format>/evaluation_<card>.json")
    first = evals[min(evals)]
    for fmt, res in list(evals.items()) + ([("original", original)] if original else []):
        for key in ("card", "dtype", "limit"):
            if res.get(key) != first.get(key):
                raise ValueError(f"ev_{fmt} has {key} {res.get(key)!r}, other formats {first.get(key)!r}: "
                                 "one card, dtype and --limit a work folder")
    formats = sorted(evals, key=lambda f: (f != SIXTEEN_BIT, f))
    res = dict(card=first["card"], dtype=first.get("dtype"), limit=first.get("limit"), rows=[], long=[],
               original=None)
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
                       ppl_ratio=ppl / base_ppl if ppl and base_ppl else None, avg=_average(s, six_task_average),
                       diff=None, se=None)
            if base and fmt != SIXTEEN_BIT and row["avg"] is not None and _average(base["scores"], six_task_average):
                try:
                    row["diff"], row["se"] = paired_difference(s, base["scores"])
                except ValueError as e:  # not the same items: no paired difference
                    print(f"quantized_quality.py: {name} {fmt}: {e}", file=sys.stderr)
            res["rows"].append(row)
            w = s.get("wikitext")
            if w and "windows" in w:
                res.setdefault("wikitext", dict(context=w.get("context"), stride=w.get("stride"), windows=w["windows"]))
    if original:
        if len(original["models"]) != 1:
            raise ValueError(f"ev_original holds {len(original['models'])} models, not the original alone")
        m = original["models"][0]
        res["original"] = dict(model=_checkpoint_name(m["model"]), bytes_per_token=m.get("kv_bytes_per_token"),
                               ppl=m["scores"].get("wikitext", {}).get("ppl"),
                               avg=_average(m["scores"], six_task_average), long={})
    contexts = sorted(int(os.path.basename(d)[4:]) for d in glob.glob(os.path.join(work, "long*"))
                      if os.path.basename(d)[4:].isdigit())
    for c in contexts:
        study = _load_json(os.path.join(work, f"long{c}"), "quantized_cache")
        # windows: as the study records them, else from the tokens scored (c - 1 a whole window)
        windows = (study or {}).get("windows") or round((study or {}).get("tokens", 0) / (c - 1)) or None
        for r in (study or {}).get("rows", []):
            res["long"].append(dict(context=c, checkpoint=r["checkpoint"], rotation=r["rotation"], cache=r["cache"],
                                    ppl=r["ppl"], ppl_ratio=r["ppl_ratio"], tokens=study.get("tokens"),
                                    windows=windows))
        ref = _load_json(os.path.join(work, f"original{c}"), "evaluation")
        if ref and res["original"] is not None:
            res["original"]["long"][c] = ref["models"][0]["scores"].get("wikitext", {}).get("ppl")
    return res


def _average(scores, six_task_average):
    """The six-task average, None while a task is missing (a run cut short,
    or --tasks without them)."""
    try:
        return six_task_average(scores)
    except (ValueError, KeyError):
        return None


def _num(x, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    limit = f"{res['limit']} items per task, the same random sample for every row" if res.get("limit") else "all items"
    w = res.get("wikitext")
    windows = (f", sliding windows of {w['context']} tokens, stride {w['stride']} ({w['windows']} windows)" if w
               else "")
    o = res.get("original")
    lines = [f"# Quality through quantized latent caches ({res['card']}, {res['dtype']})", "",
             "Every score goes through LatentKVCache as generation computes logits: a one-token prefill, then "
             "decode steps of 64 tokens that read the latents back from the cache (quantized as appended, "
             f"dequantized by the attention kernel). WikiText-2: test perplexity{windows}. Six-task average: the "
             f"paper's Table 1 average, {limit}. Differences are to the same checkpoint's 16-bit cache; the "
             "average's with its paired standard error. Bytes per token: the cache's, all layers, 16-bit rows "
             f"and rope keys in {res['dtype']}.", "",
             f"| checkpoint | cache | bytes/token{' (of the original)' if o else ''} | WikiText-2 ppl | vs 16-bit cache | "
             "6-task avg | vs 16-bit cache (paired SE) |", "|---|---|---|---|---|---|---|"]
    if o:
        lines.append(f"| original | its K/V | {_num(o['bytes_per_token'], ',')} | {_num(o['ppl'], '.2f')} | | "
                     f"{_num(o['avg'], '.2f')} | |")
    for r in res["rows"]:
        cache = "16-bit" if r["cache"] == SIXTEEN_BIT else r["cache"]
        ratio = "" if r["cache"] == SIXTEEN_BIT or r["ppl_ratio"] is None else f"{100 * (r['ppl_ratio'] - 1):+.2f}%"
        diff = "" if r["diff"] is None else f"{r['diff']:+.2f} ({r['se']:.2f})"
        nbytes = _num(r["bytes_per_token"], ",")
        if o and o.get("bytes_per_token") and r["bytes_per_token"]:  # the share of the original's K/V
            nbytes += f" ({100 * r['bytes_per_token'] / o['bytes_per_token']:.1f}%)"
        lines.append(f"| {r['checkpoint']} | {cache} | {nbytes} | {_num(r['ppl'], '.2f')} | "
                     f"{ratio} | {_num(r['avg'], '.2f')} | {diff} |")
    contexts = sorted({r["context"] for r in res["long"]})
    if contexts:
        counts = sorted({r["windows"] for r in res["long"] if r.get("windows")})
        first = f"the first {' or '.join(map(str, counts))} " if counts else "the first "
        head = " | ".join(f"ppl, {c}-token windows | vs 16-bit cache" for c in contexts)
        lines += ["", f"Long contexts: perplexity over {first}non-overlapping windows of WikiText-2 test (the same "
                  "windows for every row); rotation: the latent rotation folded into the weights at load (exact in "
                  "16 bits), which spreads channel variance before quantization.", "",
                  f"| checkpoint | rotation | cache | {head} |", "|---|---|---|" + "---|---|" * len(contexts)]
        if o and o.get("long"):
            cells = " | ".join(f"{_num(o['long'].get(c), '.2f')} | " for c in contexts)
            lines.append(f"| original | - | its K/V | {cells}|")
        found = {(r["context"], r["checkpoint"], r["rotation"], r["cache"]): r for r in res["long"]}
        keys = list(dict.fromkeys((r["checkpoint"], r["rotation"], r["cache"]) for r in res["long"]))
        for k in keys:
            cells = []
            for c in contexts:
                r = found.get((c, *k))
                rel = "" if r is None or k[2] == SIXTEEN_BIT else f"{100 * (r['ppl_ratio'] - 1):+.2f}%"
                cells.append(f"{_num(r and r['ppl'], '.2f')} | {rel}")
            cache = "16-bit" if k[2] == SIXTEEN_BIT else k[2]
            lines.append(f"| {k[0]} | {k[1]} | {cache} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python bench/quantized_quality.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                    help="converted model folders (distinct names: a run's last/ is named RUN/last)")
    ap.add_argument("--formats", default="auto,fp8,int4",
                    help="cache formats: auto (16-bit, the reference, always measured first), fp8, int4, "
                    "fp8-g<N>, int4-g<N> (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=600,
                    help="items per task and WikiText-2 windows at most; 0 = all (default: %(default)s)")
    ap.add_argument("--tasks", help="evaluate.py --tasks (default: WikiText-2 and the six tasks)")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="evaluate.py --batch-size: answer choices or windows a forward (default: %(default)s)")
    ap.add_argument("--long-contexts", default="4096,8192", metavar="TOKENS,...",
                    help="window lengths of the long-context perplexity; '' = none (default: %(default)s)")
    ap.add_argument("--long-windows", type=int, default=8, help="windows per long context (default: %(default)s)")
    ap.add_argument("--rotations", default="none,hadamard",
                    help="latent rotations of the long contexts: none, hadamard, random (default: %(default)s)")
    ap.add_argument("--original", metavar="SOURCE", help="also score the source model (folder, hub id or .gguf)")
    ap.add_argument("--data", help="evaluate.py --data: folder of the multiple-choice data")
    ap.add_argument("--ppl-data", help="text file of the perplexities (default: WikiText-2 test)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    ap.add_argument("--work", default="quantized_quality", metavar="DIR",
                    help="folder of the measurements; a second run keeps what is there (default: %(default)s)")
    ap.add_argument("--tabulate", action="store_true", help="only build the table from --work (no CHECKPOINT)")
    ap.add_argument("--out", default=RESULTS, metavar="DIR", help="folder of the table (default: bench/results)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _refusal(args, formats) -> str:
    """Why the arguments cannot run, or ''."""
    if args.tabulate:
        return "--tabulate builds the table from --work alone; leave out CHECKPOINT" if args.checkpoints else ""
    if not args.checkpoints:
        return "give converted checkpoint folders (or --tabulate with --work)"
    from mla_cuda.cache_format import is_quantized

    from mha2mla.evaluate_cli import display_name
    from mha2mla.latent_rotation import KINDS as ROTATIONS

    bad = [f for f in formats if f != SIXTEEN_BIT and not is_quantized(f)]
    if bad:
        return f"--formats {','.join(bad)}: use auto, fp8, int4, fp8-g<N> or int4-g<N>"
    bad_rot = [r for r in args.rotations.split(",") if r not in ROTATIONS]
    if bad_rot:
        return f"--rotations {','.join(bad_rot)}: use {', '.join(ROTATIONS)}"
    for path in args.checkpoints:
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{path} is not a converted checkpoint (no config.json)"
    names = [display_name(p) for p in args.checkpoints]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        return f"two checkpoints are both named {twice[0]} in the tables; give folders with distinct names"
    return ""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    formats = [SIXTEEN_BIT] + [f for f in dict.fromkeys(args.formats.split(",")) if f and f != SIXTEEN_BIT]
    try:
        contexts = [int(c) for c in args.long_contexts.split(",") if c]
    except ValueError:
        print(f"quantized_quality.py: --long-contexts takes numbers of tokens, not {args.long_contexts!r}",
              file=sys.stderr)
        return 2
    refusal = _refusal(args, formats)
    if refusal:
        print(f"quantized_quality.py: {refusal}", file=sys.stderr)
        return 2
    from mha2mla.results import save_results

    try:
        if not args.tabulate:
            rc = measure(plan(args, formats, contexts))
            if rc:
                return rc
        res = tabulate(args.work)
    except ValueError as e:
        print(f"quantized_quality.py: {e}", file=sys.stderr)
        return 2
    save_results(args.out, "quantized_quality", res["card"], res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
