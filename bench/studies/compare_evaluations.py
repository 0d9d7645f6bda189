"""Study: compare evaluated models with a baseline, item by item, with paired standard errors.

    python bench/studies/compare_evaluations.py EVAL.json [EVAL.json ...] --baseline NAME [--out DIR]

EVAL.json: `python/evaluate.py` outputs holding per-item hits (files
without them are refused by name). NAME: a substring of exactly one model's
name, usually the original. For every other model: WikiText-2 perplexity and
its ratio to the baseline's, the six-task average, its difference to the
baseline's and the paired standard error of that difference, with a 95%
interval. The paired error is the one that says whether a model really is
within a point of the original: the unpaired one (each average's own
sampling error) is several times larger, because both models get most items
equally right or wrong.
"""
import argparse
import json
import os
import sys

from mha2mla.evaluate_cli import display_name
from mha2mla.evaluation import paired_difference, six_task_average
from mha2mla.results import pyplot, save_results


def load_rows(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        for m in res["models"]:
            rows.append(dict(m, card=res.get("card"), source=os.path.basename(path)))
    return rows


def compare(rows, baseline_name: str):
    """(baseline row, [dict(model, ppl, ppl_ratio, avg, diff, se)] for every
    other row, best perplexity first)."""
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
    return base, sorted(out, key=lambda o: (o["ppl_ratio"] is None, o["ppl_ratio"] or 0))


def markdown(base, out) -> str:
    bppl = base["scores"].get("wikitext", {}).get("ppl")
    lines = [f"# Against {display_name(base['model'])} (card: {base.get('card')})", "",
             f"Baseline: WikiText-2 {f'{bppl:.2f}' if bppl else 'not measured'}, six-task average "
             f"{six_task_average(base['scores']):.2f}. "
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


def plot(base, out, path, target_ratio=None, target_diff=None):
    """Each model at (perplexity ratio, six-task difference) with its 95%
    interval; the target's corner shaded where one is given."""
    plt = pyplot()
    rows = [o for o in out if o["ppl_ratio"]]
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = "osD^v<>Ph*X"
    for i, o in enumerate(rows):  # named in the legend: the points sit too close together for labels
        ax.errorbar(o["ppl_ratio"], o["diff"], yerr=1.96 * o["se"], fmt=markers[i % len(markers)], capsize=3,
                    label=f"{display_name(o['model']).removesuffix('/last')} ({o['ppl']:.2f}, {o['avg']:.2f})")
    if target_ratio is not None and target_diff is not None:
        ax.axvline(target_ratio, color="grey", ls="--", lw=0.8)
        ax.axhline(target_diff, color="grey", ls="--", lw=0.8)
        left = min([1.0] + [o["ppl_ratio"] for o in rows])
        ax.fill_between([left, target_ratio], target_diff, max([0.5] + [o["diff"] + 2 * o["se"] for o in rows]),
                        color="green", alpha=0.08, label="target")
    ax.set_xlabel(f"WikiText-2 perplexity / {display_name(base['model'])}'s")
    ax.set_ylabel("six-task avg minus baseline's\n(points, 95% paired interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="model (ppl, avg)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python bench/studies/compare_evaluations.py", description=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evaluations", nargs="+", help="evaluation JSON files of python/evaluate.py")
    ap.add_argument("--baseline", required=True, help="a substring of the baseline model's name")
    ap.add_argument("--out", help="directory for comparison_<card>.{json,md,png}; printed only when left out")
    ap.add_argument("--target", nargs=2, type=float, metavar=("PPL_RATIO", "DIFFERENCE"),
                    help="a target corner to shade in the plot: perplexity at most PPL_RATIO times the baseline's "
                    "and an average at least DIFFERENCE points from it (e.g. 1.10 -1.0); none by default")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base, out = compare(load_rows(args.evaluations), args.baseline)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"compare_evaluations: {e}", file=sys.stderr)
        return 2
    md = markdown(base, out)
    if args.out:
        stem = save_results(args.out, "comparison", base.get("card") or "unknown",
                            dict(baseline=base["model"], models=out), md)
        plot(base, out, stem + ".png", *(args.target or (None, None)))
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
