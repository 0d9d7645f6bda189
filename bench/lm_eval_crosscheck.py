#!/usr/bin/env python
"""Cross-check of the evaluation (python/evaluate.py) against
lm-evaluation-harness: the same model, the same local data and the same
items, scored by both.

lm_eval cannot download datasets here, so this writes the chosen items of
ARC-Easy, PIQA and HellaSwag from ../shared/data/mc as jsonl in the
Hugging Face layout its task definitions read, with task YAMLs that copy
lm_eval's own prompts (arc_easy.yaml, piqa.yaml; HellaSwag's `query` and
`choices` are already preprocessed in the llama.cpp file, as lm_eval's
process_docs would make them), then runs lm_eval's HFLM on the model
object and our scorer on the same items.

Needs `pip install lm_eval`; a CPU is enough for a few hundred items. Writes
lm_eval_crosscheck_<device>.json and .md under --out (default bench/results)
and exits 1 when the two disagree by more than 0.2 points."""
import argparse
import bz2
import json
import os
import random
import sys
import tempfile
import time

import torch

from mha2mla.evaluation import MC_ROOT, evaluate_items, task_loaders
from mha2mla.results import save_results
from mha2mla.source import load_source

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_target: "{target}"
doc_to_choice: "{choice}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
# lm_eval's own templates (tasks/arc/arc_easy.yaml, tasks/piqa/piqa.yaml, tasks/hellaswag/hellaswag.yaml)
FORMATS = {
    "arc_easy": ("Question: {{question}}\\nAnswer:", "{{choices.label.index(answerKey)}}", "{{choices.text}}"),
    "piqa": ("Question: {{goal}}\\nAnswer:", "{{label}}", "{{[sol1, sol2]}}"),
    "hellaswag": ("{{query}}", "{{label}}", "{{choices}}"),
}


def raw_docs(task: str):
    """The task's records in the Hugging Face layout, in file order (the
    order our loaders read, so index i is our item i)."""
    if task == "arc_easy":
        with open(os.path.join(MC_ROOT, "arc_easy", "ARC-Easy-Test.jsonl")) as f:
            for line in f:
                d = json.loads(line)
                ch = d["question"]["choices"]
                yield dict(question=d["question"]["stem"], answerKey=str(d["answerKey"]),
                           choices=dict(text=[c["text"] for c in ch], label=[str(c["label"]) for c in ch]))
    elif task == "piqa":
        with open(os.path.join(MC_ROOT, "piqa", "valid-labels.lst")) as f:
            labels = [int(x) for x in f.read().split()]
        with open(os.path.join(MC_ROOT, "piqa", "valid.jsonl")) as f:
            for line, label in zip(f, labels):
                d = json.loads(line)
                yield dict(goal=d["goal"], sol1=d["sol1"], sol2=d["sol2"], label=label)
    else:
        with bz2.open(os.path.join(MC_ROOT, "hellaswag", "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        for i in range(0, len(lines) - 5, 6):
            yield dict(query=lines[i], label=int(lines[i + 1]), choices=lines[i + 2 : i + 6])


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/lm_eval_crosscheck.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=300, help="items per task (random, seed 0, as evaluate.py --limit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=RESULTS, help="directory for the results (default: bench/results)")
    args = p.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, model_id = load_source(None, torch.float32, device)
    loaders = task_loaders()
    work = tempfile.mkdtemp(prefix="lm_eval_xc_")
    ours, picks = {}, {}
    for task in FORMATS:
        items = loaders[task]()
        idx = random.Random(0).sample(range(len(items)), min(args.limit, len(items)))  # = evaluate.py's sample
        picks[task] = idx
        docs = list(raw_docs(task))
        assert len(docs) == len(items), f"{task}: {len(docs)} raw records, {len(items)} items"
        path = os.path.join(work, f"{task}.jsonl")
        with open(path, "w") as f:
            for i in idx:
                f.write(json.dumps(docs[i]) + "\n")
        text, target, choice = FORMATS[task]
        with open(os.path.join(work, f"xc_{task}.yaml"), "w") as f:
            f.write(YAML.format(task=f"xc_{task}", path=path, text=text, target=target, choice=choice))
        t0 = time.time()
        ours[task] = evaluate_items(model, tok, [items[i] for i in idx], args.batch_size, True, task)
        ours[task]["seconds"] = time.time() - t0
        print(task, "ours", ours[task], flush=True)
    t0 = time.time()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"xc_{t}" for t in FORMATS], num_fewshot=0,
                                  task_manager=TaskManager(include_path=work))
    theirs_seconds = time.time() - t0
    rows = []
    for task in FORMATS:
        r = out["results"][f"xc_{task}"]
        theirs = dict(acc=100 * r["acc,none"], acc_norm=100 * r["acc_norm,none"])
        rows.append(dict(task=task, n=len(picks[task]), ours=ours[task], lm_eval=theirs,
                         diff_acc=ours[task]["acc"] - theirs["acc"], diff_acc_norm=ours[task]["acc_norm"] - theirs["acc_norm"]))
    res = dict(model=model_id, device=device, lm_eval_version=lm_eval.__version__, limit=args.limit, rows=rows,
               lm_eval_seconds=theirs_seconds)
    md = [f"# evaluate.py against lm-evaluation-harness {lm_eval.__version__}", "",
          f"{model_id}, float32 on {device}; the same {args.limit} items per task (random, seed 0) from "
          "../shared/data/mc, scored by both (lm_eval through local task YAMLs with its own prompts).", "",
          "| task | items | ours acc / acc_norm | lm_eval acc / acc_norm | difference (points) |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['task']} | {r['n']} | {r['ours']['acc']:.2f} / {r['ours']['acc_norm']:.2f} | "
                  f"{r['lm_eval']['acc']:.2f} / {r['lm_eval']['acc_norm']:.2f} | {r['diff_acc']:+.2f} / {r['diff_acc_norm']:+.2f} |")
    save_results(args.out, "lm_eval_crosscheck", device, res, "\n".join(md) + "\n")
    print("\n".join(md))
    worst = max(max(abs(r["diff_acc"]), abs(r["diff_acc_norm"])) for r in rows)
    return 0 if worst <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
