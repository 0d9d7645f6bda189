"""The fine-tuning result table (issue #7): for each run, the converted
checkpoint before and after, with tokens, wall time, training throughput,
held-out loss and WikiText-2 perplexity; the original model's figures on the
same held-out split; one picture of held-out loss against training tokens.

python -m mha2mla.finetune_report RUN_DIR... --eval EVAL_JSON [--original DIR]
  [--throughput JSON] --out DIR
RUN_DIR: finetune.py --output folders; EVAL_JSON: evaluate.py's JSON holding
WikiText-2 of the original, the checkpoints and RUN_DIR/last."""
import argparse
import json
import os

import torch

from .results import pyplot, save_results


def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    held = [(r["tokens"], r["heldout_loss"]) for r in recs if "heldout_loss" in r]
    train = [r for r in recs if "loss" in r]
    return dict(name=os.path.basename(run_dir.rstrip("/")), dir=run_dir, checkpoint=run["checkpoint"], data=run["data"],
                distill_weight=run["config"]["distill_weight"], config=run["config"], heldout=held, teacher=run.get("teacher"),
                tokens=train[-1]["tokens"] if train else 0, seconds=train[-1].get("seconds") if train else None,
                tokens_per_s=train[-1].get("tokens_per_s") if train else None,
                stopped=next((r["stopped"] for r in train if "stopped" in r), None))


def original_heldout_loss(original: str, run: dict, device) -> float:
    """The original model's loss on the run's held-out sequences (same data,
    split and batches as the run's own held-out figures)."""
    from .source import load_source
    from .training import PackedData, TrainConfig, heldout_loss, tokenize_corpus

    cfg = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in run["config"].items()})
    model, tok, _ = load_source(original, torch.float32, device)
    tokens = tokenize_corpus(run["data"], tok, os.path.join(run["dir"], "token_cache"), False)
    return heldout_loss(model, PackedData(tokens, cfg.seq_len, seed=cfg.seed), cfg, torch.device(device))


def build(run_dirs, eval_json, original=None, throughput=None, device="cuda") -> dict:
    ev = json.load(open(eval_json))
    by_model = {m["model"].rstrip("/"): m for m in ev["models"]}
    runs = [read_run(d) for d in run_dirs]

    def ppl(key):
        m = by_model.get(key.rstrip("/"))
        return m["scores"]["wikitext"]["ppl"] if m and "wikitext" in m["scores"] else None

    res = dict(card=ev["card"], runs=[], original=None)
    if original:
        res["original"] = dict(model=original, wikitext_ppl=ppl(original),
                               heldout_loss=original_heldout_loss(original, runs[0], device) if runs else None)
    for r in runs:
        res["runs"].append(dict(
            name=r["name"], checkpoint=r["checkpoint"], distill_weight=r["distill_weight"], tokens=r["tokens"],
            command=command(r),
            seconds=r["seconds"], tokens_per_s=r["tokens_per_s"], stopped=r["stopped"],
            heldout_before=r["heldout"][0][1] if r["heldout"] and r["heldout"][0][0] == 0 else None,
            heldout_after=r["heldout"][-1][1] if r["heldout"] else None, heldout_curve=r["heldout"],
            ppl_before=ppl(r["checkpoint"]), ppl_after=ppl(os.path.join(r["dir"], "last")),
            kv_bytes_per_token=(by_model.get(r["checkpoint"].rstrip("/")) or {}).get("kv_bytes_per_token"),
            config={k: r["config"][k] for k in ("lr", "new_proj_lr_mult", "batch_size", "grad_accum", "seq_len",
                                                "max_steps", "train", "distill_weight", "distill_temperature")}))
    if throughput:
        res["throughput"] = json.load(open(throughput))
    return res


def command(run: dict) -> str:
    """The finetune.py command line of a run: the flags whose values differ
    from the defaults."""
    from .training import TrainConfig

    default = TrainConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in run["config"].items()
             if k != "betas" and v != getattr(default, k, None)]
    if run["distill_weight"]:
        flags.append(f"--teacher {run.get('teacher') or 'ORIGINAL'}")
    return f"python python/finetune.py {run['checkpoint']} --output {run['dir']} " + " ".join(flags)


def markdown(res) -> str:
    f = lambda x, p=2: "-" if x is None else f"{x:,.{p}f}"  # noqa: E731
    lines = [f"# Fine-tuning converted SmolLM2-135M on {res['card']}", "",
             "| run | objective | KV bytes/token | tokens | wall s | tok/s | held-out loss before → after | "
             "WikiText-2 ppl before → after |", "|---|---|---|---|---|---|---|---|"]
    o = res.get("original")
    if o:
        lines.append(f"| original | - | - | - | - | - | {f(o['heldout_loss'], 3)} | {f(o['wikitext_ppl'])} |")
    for r in res["runs"]:
        obj = "cross-entropy" if not r["distill_weight"] else f"KL to original (weight {r['distill_weight']})"
        lines.append(f"| {r['name']} | {obj} | {f(r['kv_bytes_per_token'], 0)} | {r['tokens']:,} | {f(r['seconds'], 0)} | "
                     f"{f(r['tokens_per_s'], 0)} | {f(r['heldout_before'], 3)} → {f(r['heldout_after'], 3)} | "
                     f"{f(r['ppl_before'])} → {f(r['ppl_after'])} |")
    stopped = [r for r in res["runs"] if r["stopped"]]
    if stopped:
        lines += ["", "Stopped by the time limit before the schedule's end: " + ", ".join(r["name"] for r in stopped) + "."]
    if res["runs"]:
        c = res["runs"][0]["config"]
        lines += ["", f"Recipe: AdamW (0.9, 0.95), lr {c['lr']:g} (new projections x{c['new_proj_lr_mult']:g}), "
                  f"{c['batch_size'] * c['grad_accum']} x {c['seq_len']} tokens per step, {c['max_steps']} steps, "
                  f"warmup then constant then 1-sqrt decay, bf16 autocast, parameters trained: {c['train']}."]
    cmds = [r["command"] for r in res["runs"] if r.get("command")]
    if cmds:
        lines += ["", "Commands (each with `--data` the pre-tokenized corpus):", "", "```"] + cmds + ["```"]
    t = res.get("throughput")
    if t:
        lines += ["", f"Training throughput, same loop and card (batch {t['batch']} x {t['seq']}):", "",
                  "| model | tokens/s | vs original |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['tokens_per_s']:,.0f} | {100 * r['fraction_of_original']:.1f}% |" for r in t["rows"]]
    return "\n".join(lines) + "\n"


def plot(res, path) -> None:
    plt = pyplot()
    if plt is None or not res["runs"]:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in res["runs"]:
        xs, ys = zip(*r["heldout_curve"]) if r["heldout_curve"] else ((), ())
        ax.plot([x / 1e6 for x in xs], ys, "o-", ms=3, label=r["name"])
    if res.get("original") and res["original"]["heldout_loss"] is not None:
        ax.axhline(res["original"]["heldout_loss"], color="k", ls="--", lw=0.8, label="original")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mha2mla.finetune_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finetune.py --output folders")
    ap.add_argument("--eval", required=True, help="evaluate.py JSON with WikiText-2 of the checkpoints and RUN/last")
    ap.add_argument("--original", default=None, help="the source model (folder or .gguf) for its held-out loss")
    ap.add_argument("--throughput", default=None, help="scripts/train_throughput.py JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = build(a.runs, a.eval, a.original, a.throughput, a.device)
    stem = save_results(a.out, "finetune", res["card"], res, markdown(res))
    plot(res, stem + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
