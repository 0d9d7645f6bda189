"""Study: the fine-tuning result table of finetune.py runs, to compare recipes.

For each run: the converted checkpoint before and after, with tokens, wall
time, training throughput, held-out loss and WikiText-2 perplexity; the
original model's figures on each run's held-out split and eval text; a
picture of quality against training tokens (held-out loss, and the in-loop
--eval-text perplexity where runs logged it). A run that starts from another
run's checkpoint (attention transfer, then KL) is drawn after it: its tokens
count from the end of the first stage.

python bench/studies/finetune_report.py RUN_DIR... --eval EVAL_JSON [--original DIR]
  [--throughput JSON] --out DIR
RUN_DIR: finetune.py --output folders; EVAL_JSON: evaluate.py's JSON(s) holding
WikiText-2 (and the six tasks, where measured) of the original, the
checkpoints and RUN_DIR/last."""
import argparse
import json
import os
import sys

import torch

from mha2mla.evaluation import six_task_average
from mha2mla.results import pyplot, save_results


def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    held = [(r["tokens"], r["heldout_loss"]) for r in recs if "heldout_loss" in r]
    text = [(r["tokens"], r["eval_text_ppl"]) for r in recs if "eval_text_ppl" in r]
    train = [r for r in recs if "loss" in r]
    # a later stage starts from an earlier run's checkpoint (RUN/last): its tokens come on top
    parent = os.path.dirname(run["checkpoint"].rstrip("/"))
    earlier = read_run(parent) if os.path.basename(run["checkpoint"].rstrip("/")) == "last" and \
        os.path.isfile(os.path.join(parent, "run.json")) else None
    return dict(name=os.path.basename(run_dir.rstrip("/")), dir=run_dir, checkpoint=run["checkpoint"], data=run["data"],
                distill_weight=run["config"]["distill_weight"], config=run["config"], heldout=held, eval_text=text,
                objective=run["config"].get("objective", "lm"), teacher=run.get("teacher"),
                world_size=run.get("world_size", 1), fsdp=run.get("fsdp", False),
                eval_text_file=run.get("eval_text"),
                tokens=train[-1]["tokens"] if train else 0, seconds=train[-1].get("seconds") if train else None,
                tokens_per_s=train[-1].get("tokens_per_s") if train else None,
                earlier_tokens=earlier["tokens"] + earlier["earlier_tokens"] if earlier else 0,
                earlier_name=earlier["name"] if earlier else None, source=earlier["source"] if earlier else run["checkpoint"],
                stopped=next((r["stopped"] for r in train if "stopped" in r), None)
                or (f"ended at step {train[-1]['step']} of {run['config']['max_steps']}: killed"
                    if train and train[-1]["step"] < run["config"]["max_steps"] else None))


class OriginalFigures:
    """The original model measured the way the loop measures each run: its
    loss on the run's held-out sequences (same data file, split, sequence
    length and batches) and its perplexity on the run's --eval-text. Runs on
    the same data and length share one measurement."""

    def __init__(self, original: str, device):
        from mha2mla.source import load_source

        self.model, self.tok, _ = load_source(original, torch.float32, device)
        self.device = torch.device(device)
        self.cache = {}

    def for_run(self, run: dict) -> dict:
        import math

        from mha2mla.training import PackedData, TrainConfig, eval_text_loss, heldout_loss, text_sequences, \
            tokenize_corpus

        # a run.json without eval_text_tokens scored the whole eval text
        cfg = TrainConfig(**dict(dict(eval_text_tokens=0), **{k: tuple(v) if k == "betas" else v
                                                              for k, v in run["config"].items()}))
        key = measured_on(run)
        if key not in self.cache:
            held = PackedData(tokenize_corpus(run["data"], self.tok, None, False), cfg.seq_len, seed=cfg.seed)
            out = dict(heldout_loss=heldout_loss(self.model, held, cfg, self.device))
            if run["eval_text_file"] and os.path.isfile(run["eval_text_file"]):
                text = text_sequences(run["eval_text_file"], self.tok, cfg.seq_len)
                out["eval_text_ppl"] = math.exp(eval_text_loss(self.model, text, cfg, self.device)[0])
            self.cache[key] = out
        return self.cache[key]


def measured_on(run: dict) -> tuple:
    """What the loop's held-out loss and --eval-text perplexity of a run
    depend on: its data files, sequence length, batch size (the held-out
    batches are the first batch_size x eval_batches held-out sequences), the
    tokens of eval text scored (0: all) and the eval text. Not its seed:
    that orders training sequences only."""
    c = run["config"]
    return (tuple(run["data"]), c["seq_len"], c["batch_size"], c.get("eval_batches") or 8,
            c.get("eval_text_tokens", 0), run.get("eval_text_file", run.get("eval_text")))


def earlier_original_figures(report_path: str, runs) -> dict:
    """Run name -> the original's in-loop figures from an earlier report
    (measured on a GPU in seconds, on a CPU in tens of minutes), taken from
    a run there measured the same way (measured_on; a report without an
    "eval_text" field matches on the rest); runs with none such get none."""
    with open(report_path) as f:
        earlier = [(measured_on(e), "eval_text" in e, e["original"]) for e in json.load(f)["runs"] if e.get("original")]
    out = {}
    for r in runs:
        key = measured_on(r)
        for e_key, has_text, figures in earlier:
            if e_key[:-1] == key[:-1] and (e_key[-1] == key[-1] or not has_text):
                out[r["name"]] = figures
                break
    return out


def build(run_dirs, eval_jsons, original=None, throughput=None, device="cuda", measure_original=True,
          original_from=None) -> dict:
    """eval_jsons: evaluate.py results (one path or several: a model's scores
    from all of them are merged, later files winning). original_from: an
    earlier report whose original figures are taken instead of measuring."""
    by_model, card = {}, None
    for path in [eval_jsons] if isinstance(eval_jsons, str) else eval_jsons:
        ev = json.load(open(path))
        if not isinstance(ev, dict) or "card" not in ev or not isinstance(ev.get("models"), list) or \
                any(not isinstance(m, dict) or "scores" not in m for m in ev["models"]):
            raise ValueError(f"{path} is not an evaluate.py result (card, models with scores)")
        card = card or ev["card"]
        for m in ev["models"]:
            kept = by_model.setdefault(m["model"].rstrip("/"), dict(m, scores={}))
            kept["scores"].update(m["scores"])
    runs = [read_run(d) for d in run_dirs]

    def ppl(key):
        m = by_model.get(key.rstrip("/"))
        return m["scores"]["wikitext"]["ppl"] if m and "wikitext" in m["scores"] else None

    def avg(key):
        m = by_model.get(key.rstrip("/"))
        return six_task_average(m["scores"]) if m else None

    res = dict(card=card, runs=[], original=None)
    figures = OriginalFigures(original, device) if original and measure_original and not original_from else None
    reused = earlier_original_figures(original_from, runs) if original_from else {}
    if original:
        res["original"] = dict(model=original, wikitext_ppl=ppl(original), avg=avg(original))
    for r in runs:
        res["runs"].append(dict(
            name=r["name"], checkpoint=r["checkpoint"], data=r["data"], distill_weight=r["distill_weight"], tokens=r["tokens"],
            objective=r["objective"], earlier_tokens=r["earlier_tokens"], after=r["earlier_name"],
            eval_text_curve=r["eval_text"], command=command(r),
            seconds=r["seconds"], tokens_per_s=r["tokens_per_s"], world_size=r["world_size"], stopped=r["stopped"],
            heldout_before=r["heldout"][0][1] if r["heldout"] and r["heldout"][0][0] == 0 else None,
            heldout_after=r["heldout"][-1][1] if r["heldout"] else None, heldout_curve=r["heldout"],
            ppl_before=ppl(r["checkpoint"]), ppl_after=ppl(os.path.join(r["dir"], "last")),
            avg_after=avg(os.path.join(r["dir"], "last")), original=figures.for_run(r) if figures else reused.get(r["name"], {}),
            kv_bytes_per_token=(by_model.get(r["source"].rstrip("/")) or {}).get("kv_bytes_per_token"),
            eval_text=r["eval_text_file"],
            config={k: r["config"].get(k) for k in ("lr", "new_proj_lr_mult", "batch_size", "grad_accum", "seq_len",
                                                    "max_steps", "train", "objective", "distill_weight",
                                                    "distill_temperature", "eval_batches", "eval_text_tokens",
                                                    "seed")}))
    if throughput:
        res["throughput"] = json.load(open(throughput))
    return res


def command(run: dict) -> str:
    """The finetune.py command line of a run: the flags whose values differ
    from the defaults."""
    from mha2mla.training import TrainConfig

    default = TrainConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in run["config"].items()
             if k != "betas" and v != getattr(default, k, None)]
    if run["distill_weight"] or run["objective"] == "attention":
        flags.append(f"--teacher {run.get('teacher') or 'ORIGINAL'}")
    if run.get("fsdp"):
        flags.append("--fsdp")
    flags.append("--data " + " ".join(run["data"]))
    if run.get("eval_text_file"):
        flags.append(f"--eval-text {run['eval_text_file']}")
    launcher = f"torchrun --standalone --nproc-per-node {run['world_size']}" if run.get("world_size", 1) > 1 else "python"
    return f"{launcher} python/finetune.py {run['checkpoint']} --output {run['dir']} " + " ".join(flags)


def objective_label(r: dict) -> str:
    c = r["config"]
    if r.get("objective") == "attention":
        what = "attention transfer"
    elif not r["distill_weight"]:
        what = "cross-entropy"
    elif r["distill_weight"] == 1:
        what = "KL to original"
    else:
        what = f"{1 - r['distill_weight']:g} CE + {r['distill_weight']:g} KL"
    scope = ", attention + norms" if c.get("train") == "attention" and r.get("objective") != "attention" else ""
    mult = c.get("new_proj_lr_mult") or 1
    new_proj = f" (new projections x{mult:g})" if mult != 1 else ""
    return f"{what}, lr {c['lr']:g}{new_proj}{scope}"


def processes_note(run: dict) -> str:
    """A note on a tokens/s figure summed over several torchrun processes (one per GPU)."""
    n = run.get("world_size") or 1
    return f" ({n} processes)" if n > 1 else ""


def markdown(res) -> str:
    f = lambda x, p=2: "-" if x is None else f"{x:,.{p}f}"  # noqa: E731
    lines = [f"# Fine-tuning converted SmolLM2-135M on {res['card']}", "",
             "| run | objective | after | KV bytes/token | tokens (all stages) | wall s | tok/s | held-out loss "
             "before → after | WikiText-2 valid ppl, in loop | WikiText-2 ppl before → after | 6-task avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    o = res.get("original")
    if o:
        per_row = "(in each row)" if any(r.get("original") for r in res["runs"]) else "not measured"
        lines.append(f"| original | - | - | - | - | - | - | {per_row} | {per_row} | "
                     f"{f(o['wikitext_ppl'])} | {f(o.get('avg'))} |")
    for r in res["runs"]:
        curve = r.get("eval_text_curve") or []
        ref = r.get("original") or {}
        text = f"{f(curve[0][1])} → {f(curve[-1][1])}" if curve else "-"
        text += f" (original {f(ref['eval_text_ppl'])})" if "eval_text_ppl" in ref else ""
        held = f"{f(r['heldout_before'], 3)} → {f(r['heldout_after'], 3)}"
        held += f" (original {f(ref['heldout_loss'], 3)})" if "heldout_loss" in ref else ""
        total = r["tokens"] + r.get("earlier_tokens", 0)
        lines.append(f"| {r['name']} | {objective_label(r)} | {r.get('after') or 'conversion'} | "
                     f"{f(r['kv_bytes_per_token'], 0)} | {r['tokens']:,} ({total:,}) | {f(r['seconds'], 0)} | "
                     f"{f(r['tokens_per_s'], 0)}{processes_note(r)} | {held} | {text} | "
                     f"{f(r['ppl_before'])} → {f(r['ppl_after'])} | {f(r.get('avg_after'))} |")
    stopped = [r for r in res["runs"] if r["stopped"]]
    if stopped:
        lines += ["", "Stopped before the schedule's end: " + "; ".join(f"{r['name']} ({r['stopped']})" for r in stopped)
                  + "."]
    if res["runs"]:
        shapes = sorted({f"{r['config']['batch_size'] * r['config']['grad_accum']} x {r['config']['seq_len']}"
                         for r in res["runs"]})
        lines += ["", f"Common recipe: AdamW (0.9, 0.95), {' or '.join(shapes)} tokens per step (see the commands), "
                  "warmup then constant then 1-sqrt decay over the run's steps, bf16 autocast. "
                  "Held-out loss: the training data's own held-out split (not comparable between data files). "
                  "WikiText-2 valid ppl: the loop's --eval-text, packed sequences of --seq-len tokens (no sliding "
                  "window, so higher than the test column's protocol). WikiText-2 ppl: test set, evaluate.py's "
                  "sliding window."]
    cmds = [r["command"] for r in res["runs"] if r.get("command")]
    if cmds:
        lines += ["", "Commands:", "", "```"] + cmds + ["```"]
    t = res.get("throughput")
    if t:
        lines += ["", f"Training throughput, same loop and card (batch {t['batch']} x {t['seq']}):", "",
                  "| model | tokens/s | vs original |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['tokens_per_s']:,.0f} | {100 * r['fraction_of_original']:.1f}% |" for r in t["rows"]]
    return "\n".join(lines) + "\n"


def data_label(paths) -> str:
    """Data files, short: the first file's name and how many more."""
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return names[0] + (f" + {len(names) - 1} more" if len(names) > 1 else "") if names else "no data"


def plot(res, path) -> None:
    plt = pyplot()
    if plt is None or not res["runs"]:
        return
    with_text = any(r.get("eval_text_curve") for r in res["runs"])
    # one legend of runs under the plots (four columns), so that a dozen runs leave the curves readable; each
    # plot keeps its own legend of the original's reference lines
    legend_rows = -(-len(res["runs"]) // 4)
    height = 4.2 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, 2 if with_text else 1, figsize=(12 if with_text else 6.5, height), squeeze=False)
    colors = plt.get_cmap("tab20" if len(res["runs"]) > 10 else "tab10").colors
    panels = [("heldout_curve", "held-out loss (training data's split)", "heldout_loss")]
    if with_text:
        panels.append(("eval_text_curve", "WikiText-2 valid perplexity (in loop)", "eval_text_ppl"))
    run_lines = {}
    for ax, (key, label, ref_key) in zip(axes[0], panels):
        for i, r in enumerate(res["runs"]):
            if not r.get(key):
                continue
            xs, ys = zip(*r[key])
            (run_lines[r["name"]],) = ax.plot([(x + r.get("earlier_tokens", 0)) / 1e6 for x in xs], ys, "o-", ms=2.5,
                                              lw=1, color=colors[i % len(colors)])
        # the original measured as each run's loop measures: held-out loss differs by data file as well (to 0.01:
        # one line for measurements that differ only in their batches)
        refs = {(data_label(r.get("data") or []) + ", " if key == "heldout_curve" else "", r["config"]["seq_len"],
                 round(r["original"][ref_key], 2)) for r in res["runs"] if ref_key in (r.get("original") or {})}
        for i, (data, seq_len, value) in enumerate(sorted(refs)):
            ax.axhline(value, color="k", ls=("--", ":", "-.")[i % 3], lw=0.8,
                       label=f"original ({data}{seq_len}-token sequences)")
        ax.set_xlabel("training tokens, all stages (millions)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        if refs:
            ax.legend(fontsize=7)
    fig.legend(list(run_lines.values()), list(run_lines), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.15) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/studies/finetune_report.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finetune.py --output folders")
    ap.add_argument("--eval", required=True, nargs="+",
                    help="evaluate.py JSON(s) with WikiText-2 (and the six tasks) of the checkpoints and RUN/last")
    ap.add_argument("--original", default=None,
                    help="the source model (folder or .gguf): its held-out loss and --eval-text perplexity, measured "
                    "as each run's loop measures them")
    ap.add_argument("--no-measure", action="store_true",
                    help="take the original's figures from the --eval JSONs only, without measuring its held-out "
                    "loss and --eval-text perplexity (hours on a CPU for a 135M model and 2M tokens)")
    ap.add_argument("--original-from", default=None, metavar="REPORT_JSON",
                    help="take the original's held-out loss and --eval-text perplexity from an earlier report of the "
                    "same runs (by run name) instead of measuring them")
    ap.add_argument("--throughput", default=None, help="bench/train_throughput.py JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        res = build(a.runs, a.eval, a.original, a.throughput, a.device, not a.no_measure, a.original_from)
    except (ValueError, OSError) as e:
        print(f"finetune_report: {e}", file=sys.stderr)
        return 2
    stem = save_results(a.out, "finetune", res["card"], res, markdown(res))
    plot(res, stem + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
