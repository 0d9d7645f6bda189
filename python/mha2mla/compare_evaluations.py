"""Compare evaluated models with a baseline, item by item.

    python -m mha2mla.compare_evaluations EVAL.json [EVAL.json ...] --baseline NAME [--out DIR]

EVAL.json: `python/evaluate.py` outputs holding per-item hits (saved since
2026-11-28; older files lack them and are refused by name). NAME: a
substring of exactly one model's name, usually the original. For every
other model: WikiText-2 perplexity and its ratio to the baseline's, the
six-task average, its difference to the baseline's and the paired standard
error of that difference, with a 95% interval. The paired error is the one
that says whether a model really is within a point of the original: the
unpaired one (each average's own sampling error) is several times larger,
because both models get most items equally right or wrong.
"""
import argparse
import json
import os
import sys

from .evaluation import paired_difference, six_task_average
from .evaluate_cli import display_name
from .results import save_results


def load_rows(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        for m in res["models"]:
            rows.append(dict(m, card=res.get("card"), source=os.path.basename(path)))
    return rows


def compare(rows, baseline_name: str):
    """(baseline row, [dict(model, ppl, ppl_ratio, avg, diff, se)]) for every other row."""
    base = [r for r in rows if baseline_name in r["model"]]
    if len(base) != 1:
        raise ValueError(f"--baseline {baseline_name!r} matches {len(base)} models, not one: "
                         f"{[r['model'] for r in base] or [r['model'] for r in rows]}")
    base = base[0]
    bppl = base["scores"].get("wikitext", {}).get("ppl")
    out = []
    for r in rows:
        if r is base:
            continue
        ppl = r["scores"].get("wikitext", {}).get("ppl")
        diff, se = paired_difference(r["scores"], base["scores"])
        out.append(dict(model=r["model"], source=r["source"], ppl=ppl,
                        ppl_ratio=ppl / bppl if ppl and bppl else None,
                        avg=six_task_average(r["scores"]), diff=diff, se=se))
    return base, out


def markdown(base, out) -> str:
    bppl = base["scores"].get("wikitext", {}).get("ppl")
    lines = [f"# Against {display_name(base['model'])} (card: {base.get('card')})", "",
             f"Baseline: WikiText-2 {bppl:.2f}, six-task average {six_task_average(base['scores']):.2f}. "
             "Difference: the model's six-task average minus the baseline's; SE: its paired standard error "
             "(per item, over the items both models answered); 95%: difference +- 1.96 SE.", "",
             "| model | WikiText-2 ppl | x baseline | 6-task avg | difference | paired SE | 95% interval |",
             "|---|---|---|---|---|---|---|"]
    for o in out:
        ppl = f"{o['ppl']:.2f}" if o["ppl"] else "-"
        ratio = f"{o['ppl_ratio']:.3f}" if o["ppl_ratio"] else "-"
        lo, hi = o["diff"] - 1.96 * o["se"], o["diff"] + 1.96 * o["se"]
        lines.append(f"| {display_name(o['model'])} | {ppl} | {ratio} | {o['avg']:.2f} | {o['diff']:+.2f} | "
                     f"{o['se']:.2f} | {lo:+.2f} .. {hi:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mha2mla.compare_evaluations", description=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evaluations", nargs="+", help="evaluation JSON files of python/evaluate.py")
    ap.add_argument("--baseline", required=True, help="a substring of the baseline model's name")
    ap.add_argument("--out", help="directory for comparison_<card>.{json,md}; printed only when left out")
    args = ap.parse_args(argv)
    try:
        base, out = compare(load_rows(args.evaluations), args.baseline)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"compare_evaluations: {e}", file=sys.stderr)
        return 2
    md = markdown(base, out)
    if args.out:
        save_results(args.out, "comparison", base.get("card") or "unknown",
                     dict(baseline=base["model"], models=out), md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
