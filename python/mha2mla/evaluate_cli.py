"""Command line of the evaluation (python/evaluate.py)."""
import argparse
import hashlib
import json
import os
import random
import sys
import time

import torch

from .evaluation import MC_ROOT, TASKS, DataFormatError, encode_pairs, evaluate_items, six_task_average, task_loaders
from .results import pyplot, save_results


def build_parser():
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate original and converted models the same way: WikiText-2 perplexity and zero-shot "
        "multiple choice (acc and acc_norm as lm-evaluation-harness defines them), plus KV-cache bytes per token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("models", nargs="*", default=["original"],
                   help="'original' (the source model, see --source), or converted checkpoint directories")
    p.add_argument("--source", default=None, help="source model for 'original' (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", default="wikitext," + ",".join(TASKS), help="comma-separated: wikitext and/or " + ", ".join(TASKS))
    p.add_argument("--limit", type=int, default=0, help="items per task (a random sample, fixed seed) and perplexity windows; 0 = all")
    p.add_argument("--data", default=MC_ROOT, help="folder of the multiple-choice data")
    p.add_argument("--ppl-context", type=int, default=2048, help="perplexity window")
    p.add_argument("--ppl-stride", type=int, default=512, help="perplexity stride")
    p.add_argument("--batch-size", type=int, default=16, help="choices scored per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results"),
                   help="folder for evaluation_<card>.json/.md (and a plot when several checkpoints are given)")
    p.add_argument("--resume", action="store_true",
                   help="keep the scores already in --out's evaluation_<card>.json for the same models, tasks, "
                   "limit and dtype (results are saved after every task, so an interrupted run loses one task)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load(name, source, dtype, device):
    from .checkpoint import load_mla_model
    from .source import load_source

    if name == "original":
        model, tok, model_id = load_source(source, dtype, device)
        return model, tok, model_id
    from transformers import AutoTokenizer

    return load_mla_model(name, dtype, device), AutoTokenizer.from_pretrained(name), name


def main(argv=None) -> int:
    # intermixed: `original --source DIR ck1 ck2` is read as three models, not refused
    args = build_parser().parse_intermixed_args(argv)
    from .convert_cli import WIKITEXT
    from .modeling import kv_cache_bytes_per_token
    from .perplexity import perplexity, tokenize_file

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS and t != "wikitext"]
    if unknown:
        print(f"evaluate.py: unknown task(s) {unknown}; choose from wikitext, {', '.join(TASKS)}", file=sys.stderr)
        return 2
    loaders = task_loaders(args.data)
    data = {}
    try:
        for t in tasks:
            if t != "wikitext":
                items = loaders[t]()
                if args.limit:
                    items = random.Random(0).sample(items, min(args.limit, len(items)))
                data[t] = items
    except (DataFormatError, FileNotFoundError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    res = dict(card=card, dtype=str(dtype), limit=args.limit, models=[])
    done = previous_rows(args.out, card, res) if args.resume else {}
    encodings = {}  # (task, tokenizer fingerprint) -> encode_pairs output, shared by models with one tokenizer
    for name in args.models:
        t0 = time.time()
        model, tok, model_id = load(name, args.source, dtype, device)
        row = done.get(model_id) or dict(model=model_id, scores={}, task_seconds={}, seconds=0.0)
        row["kv_bytes_per_token"] = kv_cache_bytes_per_token(model)["converted"]
        res["models"].append(row)
        for t in tasks:
            if t in row["scores"]:
                print(f"{model_id} {t}: kept from the last run", flush=True)
                continue
            t1 = time.time()
            if t == "wikitext":
                row["scores"][t] = perplexity(model, tokenize_file(tok, WIKITEXT), args.ppl_context, args.ppl_stride,
                                              args.limit if args.limit else 0, not args.quiet)
            else:
                key = (t, tokenizer_fingerprint(tok))
                if key not in encodings:
                    encodings[key] = encode_pairs(tok, [p for it in data[t] for p in it.pairs])
                row["scores"][t] = evaluate_items(model, tok, data[t], args.batch_size, not args.quiet, t, encodings[key])
            row["task_seconds"][t] = time.time() - t1
            row["seconds"] = sum(row["task_seconds"].values())
            row["six_task_average"] = six_task_average(row["scores"])
            print(f"{model_id} {t}: {row['scores'][t]} ({row['task_seconds'][t]:.0f} s)", flush=True)
            save_results(args.out, "evaluation", card, res, markdown(res), echo=False)
        row["six_task_average"] = six_task_average(row["scores"])
        print(f"{model_id}: {time.time() - t0:.0f} s with loading", flush=True)
        del model
    save_results(args.out, "evaluation", card, res, markdown(res))
    if len(res["models"]) > 2:
        plot(res, os.path.join(args.out, f"evaluation_{card.replace(' ', '_')}.png"))
    return 0


def previous_rows(out_dir: str, card: str, res: dict) -> dict:
    """Rows of an earlier run with the same card, dtype and limit, by model."""
    path = os.path.join(out_dir, f"evaluation_{card.replace(' ', '_')}.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if (old.get("dtype"), old.get("limit")) != (res["dtype"], res["limit"]):
        print(f"evaluate.py: {path} was run with another dtype or limit; starting afresh", file=sys.stderr)
        return {}
    return {m["model"]: dict(m, task_seconds=m.get("task_seconds", {})) for m in old.get("models", [])}


def tokenizer_fingerprint(tok) -> str:
    """Same fingerprint = same token ids: the serialised fast tokenizer where
    there is one (the original and its conversions share it), else identity."""
    backend = getattr(tok, "backend_tokenizer", None)
    return hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else f"id{id(tok)}"


def display_name(model_id: str) -> str:
    """A folder's own name (the JSON keeps the full path); a fine-tuning
    run's last checkpoint is named with its run ("RUN/last")."""
    if os.sep not in model_id:
        return model_id
    parent, name = os.path.split(model_id.rstrip("/"))
    return f"{os.path.basename(parent)}/{name}" if name == "last" else name


def markdown(res) -> str:
    tasks = list(dict.fromkeys(t for m in res["models"] for t in m["scores"]))
    head = ["model", "KV bytes/token"] + [("wikitext ppl" if t == "wikitext" else f"{t} acc / acc_norm") for t in tasks] + ["6-task avg", "time s"]
    lines = [f"# Evaluation on {res['card']} ({res['dtype']}{', limit ' + str(res['limit']) if res['limit'] else ''})", "",
             "Zero-shot, log-likelihood of each choice (acc; acc_norm per character, as lm-evaluation-harness). "
             "6-task average as the paper's Table 1: acc_norm of ARC (mean of Easy and Challenge), PIQA, HellaSwag, "
             "OpenBookQA and MMLU (cloze), acc of WinoGrande. WikiText-2: sliding-window perplexity. Time: "
             "scoring seconds per model (loading excluded).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in res["models"]:
        cells = [display_name(m["model"]), f"{m['kv_bytes_per_token']:,}"]
        for t in tasks:
            s = m["scores"].get(t)
            cells.append("-" if s is None else f"{s['ppl']:.2f}" if t == "wikitext" else f"{s['acc']:.1f} / {s['acc_norm']:.1f}")
        avg = m.get("six_task_average")
        cells += [f"{avg:.2f}" if avg is not None else "-", f"{m['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res, path):
    plt = pyplot()
    if plt is None:
        return
    ms = [m for m in res["models"] if m["six_task_average"] is not None]
    if len(ms) < 2:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["kv_bytes_per_token"] for m in ms], [m["six_task_average"] for m in ms], "o-")
    for m in ms:
        ax.annotate(display_name(m["model"])[:30], (m["kv_bytes_per_token"], m["six_task_average"]), fontsize=7)
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("six-task average (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
